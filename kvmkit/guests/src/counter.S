/* counter: each vCPU counts steps in memory and prints one line per step,
 *     cpu<index> n=<step> sum=<checksum>
 * Step n stores n * 0xffffffff9e3779b1 into the first word of data page (n % 16) + 1,
 * then folds all 16 data words into the running checksum:
 *     sum = rol(sum, 5) ^ word, for pages 1..16 in order.
 * The counter and checksum live in memory (the state page), so a snapshot restored
 * anywhere continues the same sequence. Before each line the guest polls the UART's
 * line status register, as a real driver does (a port read: an exit with data
 * coming back). --guest-arg = steps per vCPU (0: run until stopped); the last vCPU
 * to finish exits 0. kvmkit/guests/model.py computes the same lines. */
#include "kvmkit.h"
#define DATA_PAGES 16
#define UART_LSR (PORT_COM1 + 5)
#define LSR_THRE 0x20
LONG_MODE_ENTRY
    lea rbx, [r15 + BI_RANGES]
    call my_share
    mov r13, rdi                    /* state page: [0] step, [8] checksum */

step:
    mov rax, [r15 + BI_ARG]
    test rax, rax
    jz 1f
    cmp [r13], rax
    jae done
1:  mov rax, [r13]
    inc rax
    mov [r13], rax
    mov rcx, rax
    and ecx, DATA_PAGES - 1
    inc ecx
    shl rcx, 12
    imul rdx, rax, -0x61c8864f      /* 0xffffffff9e3779b1 */
    mov [r13 + rcx], rdx

    mov r8, [r13 + 8]
    mov ecx, 1
2:  mov rdx, rcx
    shl rdx, 12
    rol r8, 5
    xor r8, [r13 + rdx]
    inc ecx
    cmp ecx, DATA_PAGES
    jbe 2b
    mov [r13 + 8], r8

    call console_lock
    mov dx, UART_LSR
3:  in al, dx
    test al, LSR_THRE
    jz 3b
    lea rsi, [rip + msg_cpu]
    call puts
    mov rax, r14
    call putdec
    lea rsi, [rip + msg_n]
    call puts
    mov rax, [r13]
    call putdec
    lea rsi, [rip + msg_sum]
    call puts
    mov rax, [r13 + 8]
    call puthex
    lea rsi, [rip + newline]
    call puts
    call console_unlock
    jmp step

done:
    call last_one_out
    jne park
    xor edi, edi
    jmp exit

    .section .rodata
msg_cpu: .asciz "cpu"
msg_n:   .asciz " n="
msg_sum: .asciz " sum="

#include "lib.S"
