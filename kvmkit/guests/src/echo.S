/* echo: console input by interrupt. Programs the legacy PIC (IRQ base 0x20, only
 * IRQ 4 unmasked), enables the UART's received-data interrupt, prints
 *     echo: ready
 * and halts with interrupts on. The IRQ 4 handler reads every received byte and
 * echoes it; a 'q' ends the run: "echo: N byte(s)", exit 0. Nothing here polls:
 * input arrives only through the in-kernel PIC (kvmkit's default irqchip).
 * Other vCPUs halt. */
#include "kvmkit.h"
#define PIC1 0x20
#define PIC2 0xa0
#define IRQ_BASE 0x20
LONG_MODE_ENTRY
    test r14, r14
    jnz park

    lea rax, [rip + h_irq4]
    mov ecx, IRQ_BASE + 4
    call set_gate
    lea rax, [rip + h_spurious]
    mov ecx, IRQ_BASE + 7
    call set_gate
    lea rax, [rip + idt]
    mov [rip + idtr_base], rax
    lidt [rip + idtr]

    /* 8259 pair: ICW1 edge + ICW4, ICW2 vector bases, ICW3 cascade on IRQ 2, ICW4 8086 */
    mov al, 0x11
    out PIC1, al
    out PIC2, al
    mov al, IRQ_BASE
    out PIC1 + 1, al
    mov al, IRQ_BASE + 8
    out PIC2 + 1, al
    mov al, 4
    out PIC1 + 1, al
    mov al, 2
    out PIC2 + 1, al
    mov al, 1
    out PIC1 + 1, al
    out PIC2 + 1, al
    mov al, 0xef                    /* OCW1: only IRQ 4 */
    out PIC1 + 1, al
    mov al, 0xff
    out PIC2 + 1, al

    lea rsi, [rip + ready]
    call puts
    mov dx, PORT_COM1 + 4           /* MCR: OUT2 (the PC's IRQ enable), DTR, RTS */
    mov al, 0x0b
    out dx, al
    mov dx, PORT_COM1 + 1           /* IER: received data available */
    mov al, 1
    out dx, al

1:  sti
    hlt
    cli
    cmp byte ptr [rip + done], 0
    je 1b

    lea rsi, [rip + bye_pre]
    call puts
    mov rax, [rip + count]
    call putdec
    lea rsi, [rip + bye_post]
    call puts
    xor edi, edi
    jmp exit

h_irq4:
    push rax
    push rdx
2:  mov dx, PORT_COM1 + 5           /* LSR */
    in al, dx
    test al, 1                      /* data ready */
    jz 3f
    mov dx, PORT_COM1
    in al, dx
    out dx, al                      /* echo it */
    inc qword ptr [rip + count]
    cmp al, 'q'
    jne 2b
    mov byte ptr [rip + done], 1
    jmp 2b
3:  mov al, 0x20                    /* EOI */
    out PIC1, al
    pop rdx
    pop rax
    iretq

h_spurious:
    iretq

#include "lib.S"

    .section .rodata
ready:    .asciz "echo: ready\n"
bye_pre:  .asciz "\necho: "
bye_post: .asciz " byte(s)\n"

    .data
    .balign 8
count:      .quad 0
idtr:       .word 256 * 16 - 1
idtr_base:  .quad 0
done:       .byte 0
    .balign 16
idt:        .fill 256 * 16, 1, 0
