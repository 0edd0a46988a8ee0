/* Exits with the status in BI_ARG. */
#include "kvmkit.h"
    .intel_syntax noprefix
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    mov eax, [rdi + BI_ARG]
    mov dx, PORT_DEBUG_EXIT
    out dx, eax
    hlt
