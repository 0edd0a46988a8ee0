/* kvmkit guest ABI, version 1. Mirrored by kvmkit/guests/abi.py (a unit test
 * checks that the two agree).
 *
 * Long-mode entry: RDI = boot info address, RSI = vCPU index, RSP = the vCPU's
 * own stack; paging identity-maps all RAM with 2 MiB pages; interrupts off.
 */
#define BOOT_MAGIC      0x31544f4f424b4b4b  /* "KKKBOOT1" */

#define BI_MAGIC        0   /* u64 */
#define BI_RAM_BYTES    8   /* u64: configured guest RAM */
#define BI_NR_VCPUS     16  /* u32 */
#define BI_FLAGS        20  /* u32: BOOT_FLAG_* */
#define BI_NR_RANGES    24  /* u32: entries in BI_RANGES */
#define BI_ARG          32  /* u64: --guest-arg */
#define BI_CONSOLE_LOCK 40  /* u64: guest-owned spinlock for the console */
#define BI_DONE         48  /* u64: guest-owned counter */
#define BI_RANGES       64  /* {u64 start, u64 end}[BI_MAX_RANGES]: RAM free for the guest */
#define BI_MAX_RANGES   4
#define BI_SIZE         128

#define BOOT_FLAG_PVM_HOST 1

#define PORT_POST       0x80    /* POST code: a byte, recorded, no effect */
#define PORT_COM1       0x3f8   /* 16550A UART */
#define PORT_DEBUG_EXIT 0x501   /* a 32-bit write ends the run with that status */
#define PORT_PACE       0x82    /* a write waits for the next 1 ms tick of the host */

/* The first instructions of a long-mode guest that uses lib.S: its code goes first in
 * the image, and it keeps the boot info in r15 and its vCPU index in r14. */
#define LONG_MODE_ENTRY \
    .intel_syntax noprefix; .code64; .section .text.start, "ax"; .globl _start; \
    _start: mov r15, rdi; mov r14, rsi
