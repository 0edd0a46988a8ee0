/* touch: every vCPU writes one word to each 4 KiB page of its share of free RAM
 * (the first touch that makes the host allocate it), then the last vCPU to finish
 * exits 0. Used by benchmarks/memory_populate.py. */
#include "kvmkit.h"
LONG_MODE_ENTRY
    mov r12d, [r15 + BI_NR_RANGES]
    lea rbx, [r15 + BI_RANGES]
1:  test r12, r12
    jz 3f
    call my_share
2:  cmp rdi, rsi
    jae 4f
    mov [rdi], rdi
    add rdi, 4096
    jmp 2b
4:  add rbx, 16
    dec r12
    jmp 1b
3:  call last_one_out
    jne park
    xor edi, edi
    jmp exit

#include "lib.S"
