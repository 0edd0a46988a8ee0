/* hello16: a real-mode guest. Prints a line on COM1 and exits 0. */
#include "kvmkit.h"
    .code16
    .intel_syntax noprefix
    .section .text.start, "ax"
    .globl _start
_start:
    mov si, offset message
    mov dx, PORT_COM1
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  xor eax, eax
    mov dx, PORT_DEBUG_EXIT
    out dx, eax
3:  cli
    hlt
    jmp 3b
message: .asciz "hello from real mode\n"
