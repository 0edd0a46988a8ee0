/* memtest: every vCPU tests its own share of each free RAM range (one word per
 * 4 KiB page, written then verified), reports on the console, and the last one
 * to finish exits 0. A mismatch exits 1 at once. */
#include "kvmkit.h"
LONG_MODE_ENTRY
    xor r13, r13                    /* pages tested by this vCPU */
    mov r12d, [r15 + BI_NR_RANGES]
    lea rbx, [r15 + BI_RANGES]
1:  test r12, r12
    jz 3f
    call my_share
    call pattern_test
    test rax, rax
    jnz 5f
    add r13, rcx
    add rbx, 16
    dec r12
    jmp 1b

3:  call console_lock
    lea rsi, [rip + vcpu_pre]
    call puts
    mov rax, r14
    call putdec
    lea rsi, [rip + vcpu_ok]
    call puts
    mov rax, r13
    call putdec
    lea rsi, [rip + pages_ok]
    call puts
    call console_unlock

    call last_one_out
    jne park
    call console_lock
    lea rsi, [rip + all_pre]
    call puts
    mov eax, [r15 + BI_NR_VCPUS]
    call putdec
    lea rsi, [rip + all_post]
    call puts
    call console_unlock
    xor edi, edi
    jmp exit

5:  mov rbx, rax
    call console_lock
    lea rsi, [rip + vcpu_pre]
    call puts
    mov rax, r14
    call putdec
    lea rsi, [rip + vcpu_bad]
    call puts
    mov rax, rbx
    call puthex
    lea rsi, [rip + newline]
    call puts
    call console_unlock
    mov edi, 1
    jmp exit

#include "lib.S"

    .section .rodata
vcpu_pre: .asciz "memtest: vCPU "
vcpu_ok:  .asciz ": ok, "
pages_ok: .asciz " pages\n"
vcpu_bad: .asciz ": MISMATCH at "
all_pre:  .asciz "memtest: all "
all_post: .asciz " vCPUs passed\n"
