/* hello: the embedded default guest. vCPU 0 prints a banner with the memory
 * size and vCPU count, writes and verifies a pattern on every page of free RAM,
 * and exits 0. Other vCPUs halt. */
#include "kvmkit.h"
LONG_MODE_ENTRY
    test r14, r14
    jnz park

    lea rsi, [rip + banner]
    call puts
    mov rax, [r15 + BI_RAM_BYTES]
    shr rax, 20
    call putdec
    lea rsi, [rip + mib_sep]
    call puts
    mov eax, [r15 + BI_NR_VCPUS]
    call putdec
    lea rsi, [rip + vcpus_nl]
    call puts

    xor r13, r13                    /* pages tested */
    mov r12d, [r15 + BI_NR_RANGES]
    lea rbx, [r15 + BI_RANGES]
1:  test r12, r12
    jz 2f
    mov rdi, [rbx]
    mov rsi, [rbx + 8]
    call pattern_test
    test rax, rax
    jnz 3f
    add r13, rcx
    add rbx, 16
    dec r12
    jmp 1b

2:  lea rsi, [rip + ok_pre]
    call puts
    mov rax, r13
    call putdec
    lea rsi, [rip + ok_mid]
    call puts
    mov rax, r13
    shr rax, 8                      /* pages -> MiB */
    call putdec
    lea rsi, [rip + ok_post]
    call puts
    xor edi, edi
    jmp exit

3:  mov rbx, rax
    lea rsi, [rip + bad]
    call puts
    mov rax, rbx
    call puthex
    lea rsi, [rip + newline]
    call puts
    mov edi, 1
    jmp exit

#include "lib.S"

    .section .rodata
banner:   .asciz "hello from kvmkit: "
mib_sep:  .asciz " MiB, "
vcpus_nl: .asciz " vCPU(s)\n"
ok_pre:   .asciz "hello: pattern written and verified on "
ok_mid:   .asciz " pages ("
ok_post:  .asciz " MiB of free RAM)\nhello: bye\n"
bad:      .asciz "hello: pattern mismatch at "
