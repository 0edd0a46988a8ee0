"""The fixed guest-physical addresses kvmkit uses to boot Linux, in one place.

Everything the loader writes besides the kernel and the initrd sits in low memory
below the EBDA, in pages Linux copies or rebuilds before it uses them (so the e820 map
reports them as RAM, as other VMMs do):

    0x00000-0x00fff  untouched: real-mode IVT/BDA; a 0 address means "absent" in PVH
    0x01000          GDT (BOOT_GDT_GPA), one page; selectors 0x10 code, 0x18 data, 0x20 TSS
    0x06000          PVH hvm_start_info (56 bytes)
    0x06040          PVH hvm_modlist_entry[1]: the initrd as module 0
    0x06100          PVH hvm_memmap_table_entry[<=128] (up to 3 KiB, ends by 0x6d00)
    0x07000          zero page, struct boot_params (64-bit boot protocol), 4 KiB
    0x08000-0x08fff  boot stack for the 64-bit entry; RSP starts at BOOT_STACK_TOP
    0x09000-0x0efff  identity page tables for the 64-bit entry: PML4, PDPT, 4 PDs of
                     2 MiB pages mapping [0, 4 GiB), every entry U=1 (PVM hosts need it)
    0x20000-0x2ffff  kernel command line, NUL terminated (CMDLINE_GPA, CMDLINE_AREA_BYTES)
    0x9fc00-0xfffff  reserved in the e820 map (EBDA, VGA, BIOS): the VMM puts the MP
                     table at MPTABLE_GPA (floating pointer, then the config table)
    0x100000-        the kernel: a vmlinux at its segments' physical addresses (usually
                     16 MiB), a bzImage's protected-mode part at its pref_address
    below the top of low RAM (at most 3 GiB): the initrd, page aligned, as high as fits
    under the kernel's initrd limit (initrd_addr_max, or 0x37ffffff for a vmlinux)
"""

BOOT_GDT_GPA = 0x1000
PVH_START_INFO_GPA = 0x6000
PVH_MODLIST_GPA = 0x6040
PVH_MEMMAP_GPA = 0x6100
ZERO_PAGE_GPA = 0x7000
BOOT_STACK_GPA = 0x8000
BOOT_STACK_TOP = 0x9000
BOOT_PAGE_TABLES_GPA = 0x9000
BOOT_PAGE_TABLES_END = 0xF000
CMDLINE_GPA = 0x20000
CMDLINE_AREA_BYTES = 0x10000
BOOT_AREA = (BOOT_GDT_GPA, CMDLINE_GPA + CMDLINE_AREA_BYTES)  # all of the above, [start, end)

MPTABLE_GPA = 0x9FC00
LEGACY_RESERVED = (0x9FC00, 0x100000)  # EBDA, VGA window, option ROMs, BIOS: [start, end)

HIGH_MEMORY_START = 0x100000  # no kernel byte may sit below 1 MiB
IDENTITY_MAP_BYTES = 4 << 30  # what the 64-bit entry's page tables map
LOW_RAM_LIMIT = 4 << 30  # the kernel, initrd and boot data all stay below 4 GiB
