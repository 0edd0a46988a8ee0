/* Spins forever without a single VM exit: only a kick from the VMM stops it. */
    .intel_syntax noprefix
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    jmp _start
