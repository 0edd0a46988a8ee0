/* trap: installs handlers for NMI (2), #UD (6), #GP (13), #PF (14) and #MC (18),
 * sets CR4.MCE, then writes the POST port BI_ARG times (one exit each: the host
 * delivers guest events between them). Each delivered event prints
 *     trap: vector V error E info I
 * (I: CR2 for #PF, MC0_ADDR for #MC, else 0), and returns to where the guest was.
 * At the end: "trap: N event(s)", exit 0. Other vCPUs halt. */
#include "kvmkit.h"
LONG_MODE_ENTRY
    test r14, r14
    jnz park

    lea rax, [rip + h_nmi]
    mov ecx, 2
    call set_gate
    lea rax, [rip + h_ud]
    mov ecx, 6
    call set_gate
    lea rax, [rip + h_gp]
    mov ecx, 13
    call set_gate
    lea rax, [rip + h_pf]
    mov ecx, 14
    call set_gate
    lea rax, [rip + h_mc]
    mov ecx, 18
    call set_gate
    lea rax, [rip + idt]
    mov [rip + idtr_base], rax
    lidt [rip + idtr]
    mov rax, cr4
    or rax, 0x40                    /* CR4.MCE: deliver machine checks, not a shutdown */
    mov cr4, rax

    lea rsi, [rip + ready]
    call puts
    mov rcx, [r15 + BI_ARG]
    test rcx, rcx
    jz 2f
1:  mov al, cl
    out PORT_POST, al
    dec rcx
    jnz 1b
2:  lea rsi, [rip + done_pre]
    call puts
    mov rax, [rip + events]
    call putdec
    lea rsi, [rip + done_post]
    call puts
    xor edi, edi
    jmp exit

/* Handlers: push a zero error code where the CPU pushes none, then the vector. */
h_nmi:
    push 0
    push 2
    jmp handle
h_ud:
    push 0
    push 6
    jmp handle
h_gp:
    push 13
    jmp handle
h_pf:
    push 14
    jmp handle
h_mc:
    push 0
    push 18
    jmp handle

/* handle: print the event, count it, return to the interrupted instruction.
 * Stack: 9 saved registers (72 bytes), vector, error code, the CPU's frame. */
handle:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    inc qword ptr [rip + events]
    lea rsi, [rip + s_vector]
    call puts
    mov rax, [rsp + 72]
    call putdec
    lea rsi, [rip + s_error]
    call puts
    mov rax, [rsp + 80]
    call puthex
    lea rsi, [rip + s_info]
    call puts
    xor eax, eax
    cmp qword ptr [rsp + 72], 14
    jne 1f
    mov rax, cr2
1:  cmp qword ptr [rsp + 72], 18
    jne 2f
    mov ecx, 0x402                  /* MC0_ADDR */
    rdmsr
    shl rdx, 32
    or rax, rdx
    push rax
    xor eax, eax                    /* clear MCG_STATUS.MCIP and MC0_STATUS */
    xor edx, edx
    mov ecx, 0x17a
    wrmsr
    mov ecx, 0x401
    wrmsr
    pop rax
2:  call puthex
    lea rsi, [rip + newline]
    call puts
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq

#include "lib.S"

    .section .rodata
ready:     .asciz "trap: handlers ready\n"
s_vector:  .asciz "trap: vector "
s_error:   .asciz " error "
s_info:    .asciz " info "
done_pre:  .asciz "trap: "
done_post: .asciz " event(s)\n"

    .data
    .balign 8
events:    .quad 0
idtr:      .word 256 * 16 - 1
idtr_base: .quad 0
    .balign 16
idt:       .fill 256 * 16, 1, 0
