/* discard_probe: used by `kvmkit selftest memory`. Writes a word at the address in
 * BI_ARG, asks the host to discard that page (a write to PORT_DISCARD_PROBE), reads
 * the word back and exits 0 if it reads zero, 1 if the old value survived. */
#include "kvmkit.h"
#define PORT_DISCARD_PROBE 0x510
    .intel_syntax noprefix
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    mov rbx, [rdi + BI_ARG]
    movabs rax, 0x1122334455667788
    mov [rbx], rax
    mov dx, PORT_DISCARD_PROBE
    out dx, al
    mov rax, [rbx]
    xor edi, edi
    test rax, rax
    jz 1f
    mov edi, 1
1:  mov eax, edi
    mov dx, PORT_DEBUG_EXIT
    out dx, eax
    hlt
