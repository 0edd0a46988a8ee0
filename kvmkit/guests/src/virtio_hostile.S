/* virtio_hostile: a hostile virtio-mmio driver for the device in the first MMIO slot
 * (0xD0000000; tests give the machine one virtio-rng). BI_ARG picks the case:
 *
 *   0 a valid request (the baseline)       5 notify before DRIVER_OK
 *   1 a descriptor loop (0 -> 0)           6 a storm of config and register writes
 *   2 a buffer outside guest RAM           7 the available index 1000 entries ahead
 *   3 a length that wraps the address space 8 a used ring over the descriptor table
 *   4 queue size 3 (not a power of two)
 *
 * Phase 1 sets the device up with the case's flaw, notifies and watches: 1 if the
 * device set DEVICE_NEEDS_RESET, 2 if it returned the buffer, 3 if it did nothing
 * (ignored the queue). Phase 2 resets the device and makes one valid request, with
 * the same outcome codes. The guest exits with phase1 << 4 | phase2: 0x12 is "the
 * device refused the flaw, then worked after a reset".
 */
#include "kvmkit.h"
#define VIRTIO     0xD0000000
#define PD_GPA     0x400000
#define DESC       0x410000
#define AVAIL      0x411000
#define USED       0x412000
#define BUF        0x420000
#define QSIZE      8
#define STATUS     0x70
#define NEEDS_RESET 0x40

LONG_MODE_ENTRY
    /* map the 2 MiB holding 0xD0000000 (uncached): a page directory for GiB 3 */
    mov rcx, 0xfffffffffffff000
    mov rax, cr3
    and rax, rcx
    mov rax, [rax]
    and rax, rcx
    mov qword ptr [rax + 3 * 8], PD_GPA | 3
    mov rdx, PD_GPA
    mov esi, VIRTIO | 0x9b
    mov [rdx + 128 * 8], rsi
    mov rax, cr3
    mov cr3, rax
    mov ebx, VIRTIO
    mov r13, [r15 + BI_ARG]
    call hostile
    mov r12d, eax
    call valid
    shl r12d, 4
    or eax, r12d
    mov edi, eax
    jmp exit

/* setup: reset, negotiate VERSION_1, queue 0 of esi entries with its used ring at
 * r8, QueueReady; no DRIVER_OK */
setup:
    mov dword ptr [rbx + STATUS], 0
    mov dword ptr [rbx + STATUS], 3
    mov dword ptr [rbx + 0x24], 1
    mov dword ptr [rbx + 0x20], 1
    mov dword ptr [rbx + 0x24], 0
    mov dword ptr [rbx + 0x20], 0
    mov dword ptr [rbx + STATUS], 0xb
    mov rdi, DESC
    mov ecx, 0x3000 / 8
    xor eax, eax
    rep stosq
    mov dword ptr [rbx + 0x30], 0
    mov [rbx + 0x38], esi
    mov dword ptr [rbx + 0x80], DESC
    mov dword ptr [rbx + 0x84], 0
    mov dword ptr [rbx + 0x90], AVAIL
    mov dword ptr [rbx + 0x94], 0
    mov [rbx + 0xa0], r8d
    mov dword ptr [rbx + 0xa4], 0
    mov dword ptr [rbx + 0x44], 1
    ret

driver_ok:
    mov dword ptr [rbx + STATUS], 0xf
    ret

/* desc: descriptor 0 = rax addr, ecx len, edx flags | next << 16 */
desc:
    mov rdi, DESC
    mov [rdi], rax
    mov [rdi + 8], ecx
    mov [rdi + 12], edx
    ret

/* offer: head 0 in avail ring slot 0, avail idx = ecx, then QueueNotify(0) */
offer:
    mov rdx, AVAIL
    mov word ptr [rdx + 4], 0
    mov [rdx + 2], cx
    mov dword ptr [rbx + 0x50], 0
    ret

/* wait: up to ecx ms for NEEDS_RESET (eax 1) or a used buffer (2); else 3 */
wait:
1:  mov eax, [rbx + STATUS]
    test eax, NEEDS_RESET
    jnz 2f
    mov rdx, USED
    movzx eax, word ptr [rdx + 2]
    test eax, eax
    jnz 3f
    mov dx, PORT_PACE
    out dx, al
    dec ecx
    jnz 1b
    mov eax, 3
    ret
2:  mov eax, 1
    ret
3:  mov eax, 2
    ret

hostile:
    mov esi, QSIZE
    cmp r13, 4
    jne 1f
    mov esi, 3
1:  mov r8d, USED
    cmp r13, 8
    jne 1f
    mov r8d, DESC + 0x40
1:  call setup
    mov rax, BUF
    mov ecx, 16
    mov edx, 2                      /* WRITE */
    cmp r13, 1
    jne 1f
    mov edx, 3                      /* WRITE | NEXT, next = 0: itself */
1:  cmp r13, 2
    jne 1f
    mov eax, 0x40000000             /* 1 GiB: past the guest's RAM */
1:  cmp r13, 3
    jne 1f
    mov rax, 0xfffffffffffff000
    mov ecx, 0x2000
1:  call desc
    cmp r13, 5
    je 1f
    call driver_ok
1:  cmp r13, 6
    jne 1f
    call storm
1:  mov ecx, 1
    cmp r13, 7
    jne 1f
    mov ecx, 1000
1:  call offer
    mov ecx, 3000
    cmp r13, 5
    jne 1f
    mov ecx, 200                    /* nothing is expected: do not wait long */
1:  jmp wait

/* storm: 5000 rounds of writes to the configuration space and to selector and
 * acknowledge registers with changing values, then QueueSel back to 0 */
storm:
    xor ecx, ecx
1:  mov eax, ecx
    and eax, 0xfc
    mov [rbx + rax + 0x100], ecx
    mov [rbx + 0x14], ecx
    mov [rbx + 0x24], ecx
    mov [rbx + 0x30], ecx
    mov [rbx + 0x64], ecx
    mov edx, [rbx + 0x10]
    inc ecx
    cmp ecx, 5000
    jb 1b
    mov dword ptr [rbx + 0x30], 0
    mov dword ptr [rbx + 0x14], 0
    ret

valid:
    mov esi, QSIZE
    mov r8d, USED
    call setup
    mov rax, BUF
    mov ecx, 16
    mov edx, 2
    call desc
    call driver_ok
    mov ecx, 1
    call offer
    mov ecx, 5000
    jmp wait

#include "lib.S"
