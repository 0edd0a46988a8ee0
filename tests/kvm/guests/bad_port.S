/* Writes a port no kvmkit device claims. */
    .intel_syntax noprefix
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    mov dx, 0x1234
    mov al, 0x5a
    out dx, al
    hlt
