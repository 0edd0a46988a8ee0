/* Routines shared by kvmkit's long-mode guests. Calling convention: arguments
 * in rdi/rsi/rax as noted; rax, rcx, rdx, rsi, rdi, r8-r11 are clobbered.
 * r15 holds the boot info address and r14 the vCPU index throughout.
 */
    .intel_syntax noprefix
    .code64
    .text

/* putc: print the byte in al */
putc:
    mov dx, PORT_COM1
    out dx, al
    ret

/* puts: print the NUL-terminated string at rsi */
puts:
    mov dx, PORT_COM1
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  ret

/* putdec: print rax in decimal */
putdec:
    sub rsp, 32
    lea rdi, [rsp + 31]
    mov byte ptr [rdi], 0
    mov rcx, 10
1:  xor edx, edx
    div rcx
    add dl, '0'
    dec rdi
    mov [rdi], dl
    test rax, rax
    jnz 1b
    mov rsi, rdi
    call puts
    add rsp, 32
    ret

/* puthex: print rax as 0x followed by hex digits */
puthex:
    mov r8, rax
    mov al, '0'
    call putc
    mov al, 'x'
    call putc
    mov ecx, 60
1:  mov rax, r8
    shr rax, cl
    and eax, 15
    jnz 2f
    test ecx, ecx
    jz 2f
    sub ecx, 4
    jmp 1b
2:  mov rax, r8
    shr rax, cl
    and eax, 15
    lea rdx, [rip + hexdigits]
    mov al, [rdx + rax]
    push rcx
    call putc
    pop rcx
    sub ecx, 4
    jns 2b
    ret

/* console_lock / console_unlock: serialise lines from several vCPUs */
console_lock:
    mov eax, 1
1:  xchg rax, [r15 + BI_CONSOLE_LOCK]
    test rax, rax
    jz 2f
    pause
    mov eax, 1
    jmp 1b
2:  ret

console_unlock:
    mov qword ptr [r15 + BI_CONSOLE_LOCK], 0
    ret

/* pattern_test: write, then verify, the 8-byte word (address ^ PATTERN) at the
 * start of every 4 KiB page in [rdi, rsi).
 * Returns rax = 0 and rcx = pages tested, or rax = the first bad address. */
pattern_test:
    movabs rdx, 0x5a5aa5a5c3c33c3c
    mov rcx, rdi
1:  cmp rcx, rsi
    jae 2f
    mov rax, rcx
    xor rax, rdx
    mov [rcx], rax
    add rcx, 4096
    jmp 1b
2:  mov rcx, rdi
3:  cmp rcx, rsi
    jae 4f
    mov rax, rcx
    xor rax, rdx
    cmp [rcx], rax
    jne 5f
    add rcx, 4096
    jmp 3b
4:  mov rcx, rsi
    sub rcx, rdi
    shr rcx, 12
    xor eax, eax
    ret
5:  mov rax, rcx
    ret

/* my_share: this vCPU's share of the free range at rbx ({u64 start, u64 end}).
 * The range is split into nr_vcpus page-aligned parts; the last vCPU also takes the
 * remainder. Returns rdi = start, rsi = end. */
my_share:
    mov rax, [rbx + 8]
    sub rax, [rbx]
    xor edx, edx
    mov ecx, [r15 + BI_NR_VCPUS]
    div rcx
    and rax, -4096
    mov rdi, rax
    imul rdi, r14
    add rdi, [rbx]
    lea rsi, [rdi + rax]
    mov ecx, [r15 + BI_NR_VCPUS]
    dec ecx
    cmp r14, rcx
    jne 1f
    mov rsi, [rbx + 8]
1:  ret

/* last_one_out: count this vCPU as finished; returns ZF set for the last one */
last_one_out:
    mov eax, 1
    lock xadd [r15 + BI_DONE], rax
    inc eax
    cmp eax, [r15 + BI_NR_VCPUS]
    ret

/* set_gate: IDT entry ecx -> handler rax (a 64-bit interrupt gate, selector 0x8), in
 * the table at `idt`, which a guest that calls this defines (weak here, so guests
 * without an IDT link) */
    .weak idt
set_gate:
    lea rdx, [rip + idt]
    shl rcx, 4
    add rdx, rcx
    mov word ptr [rdx], ax
    mov word ptr [rdx + 2], 0x8
    mov word ptr [rdx + 4], 0x8e00
    shr rax, 16
    mov word ptr [rdx + 6], ax
    shr rax, 16
    mov dword ptr [rdx + 8], eax
    mov dword ptr [rdx + 12], 0
    ret

/* exit: end the run with the status in edi; never returns */
exit:
    mov eax, edi
    mov dx, PORT_DEBUG_EXIT
    out dx, eax
    /* fall through: the VMM stops this vCPU */

/* park: halt this vCPU for good */
park:
    cli
    hlt
    jmp park

    .section .rodata
hexdigits: .ascii "0123456789abcdef"
newline:   .asciz "\n"
