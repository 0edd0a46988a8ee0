/* Executes ud2 with no IDT: #UD -> #DF -> triple fault -> KVM_EXIT_SHUTDOWN. */
    .intel_syntax noprefix
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    lidt [rip + null_idt]
    ud2
null_idt:
    .word 0
    .quad 0
