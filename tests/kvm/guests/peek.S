/* Prints the 8-byte word at the guest-physical address in BI_ARG (written by
 * the host before the run), then writes 0xfeedface0000 + vCPU index at
 * BI_ARG + 8 for the host to read back, and exits 0. */
#include "kvmkit.h"
LONG_MODE_ENTRY
    mov rbx, [r15 + BI_ARG]
    lea rsi, [rip + label]
    call puts
    mov rax, [rbx]
    call puthex
    lea rsi, [rip + newline]
    call puts
    movabs rax, 0xfeedface0000
    add rax, r14
    mov [rbx + 8], rax
    xor edi, edi
    jmp exit

#include "lib.S"

    .section .rodata
label: .asciz "peek: "
