/* dirtier: vCPU 0 writes memory at a set rate. --guest-arg packs three fields:
 *   bits 0-31   pages per round; a round then waits on the pace port for the next
 *               millisecond, so this is pages per ms (0: 256 pages a round, unpaced)
 *   bits 32-47  the working set in MiB, cycled through from the second free range
 *               (0: 16 MiB; clipped to the range)
 *   bits 48-63  rounds to run before exiting 0 (0: run until stopped)
 * Each round writes the round number into the first word of that many pages. Every
 * 1000 rounds it prints "dirtier: round N"; at the end "dirtier: done after N rounds".
 * The other vCPUs halt. */
#include "kvmkit.h"
LONG_MODE_ENTRY
    test r14, r14
    jnz park
    mov r12, [r15 + BI_ARG]
    mov r13d, r12d                  /* pages per round */
    mov r9, r12
    shr r9, 48                      /* rounds (0: forever) */
    shr r12, 32
    and r12d, 0xffff
    jnz 1f
    mov r12d, 16
1:  shl r12, 20                     /* working set bytes */
    mov rbx, [r15 + BI_RANGES + 16] /* the second free range: after the image */
    add rbx, 0xfff
    and rbx, -4096
    mov rax, [r15 + BI_RANGES + 24]
    sub rax, rbx
    cmp r12, rax
    jbe 2f
    mov r12, rax
    and r12, -4096
2:  xor ebp, ebp                    /* offset in the working set */
    xor r8d, r8d                    /* round */
round:
    cmp r8, r9
    jne 6f
    test r9, r9
    jnz done
6:  inc r8
    mov ecx, r13d
    test ecx, ecx
    jnz 3f
    mov ecx, 256                    /* unpaced: 256 pages a round */
3:  mov [rbx + rbp], r8
    add rbp, 4096
    cmp rbp, r12
    jb 4f
    xor ebp, ebp
4:  dec ecx
    jnz 3b
    test r13d, r13d
    jz 5f
    out PORT_PACE, al
5:  mov rax, r8
    xor edx, edx
    mov ecx, 1000
    div rcx
    test rdx, rdx
    jnz round
    lea rsi, [rip + msg_round]
    lea rdi, [rip + newline]
    call report
    jmp round

done:
    lea rsi, [rip + msg_done]
    lea rdi, [rip + msg_rounds]
    call report
    xor edi, edi
    jmp exit

/* report: print the string at rsi, the round number r8, then the string at rdi
 * (r8 and r9 are kept) */
report:
    push r8
    push r9
    push rdi
    call puts
    mov rax, [rsp + 16]
    call putdec
    pop rsi
    call puts
    pop r9
    pop r8
    ret

#include "lib.S"

    .section .rodata
msg_round:  .asciz "dirtier: round "
msg_done:   .asciz "dirtier: done after "
msg_rounds: .asciz " rounds\n"
