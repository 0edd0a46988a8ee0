/* exitloop: write the POST port (a VM exit each) BI_ARG times, then exit 0.
 * Used by benchmarks/exit_roundtrip.py. */
#include "kvmkit.h"
    .intel_syntax noprefix
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    mov r15, rdi
    test rsi, rsi
    jnz 2f
    mov rcx, [r15 + BI_ARG]
    mov dx, PORT_POST
    test rcx, rcx
    jz 1f
0:  out dx, al
    dec rcx
    jnz 0b
1:  mov dx, PORT_DEBUG_EXIT
    xor eax, eax
    out dx, eax
2:  cli
    hlt
    jmp 2b
