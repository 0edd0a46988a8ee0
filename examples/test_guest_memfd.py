"""guest_memfd: a guest store lands in the file; after a host punch the guest reads 0."""

STORE = """
    mov rax, 0x6b766d6b6974          /* the bytes "tikmvk" */
    mov [0x200000], rax              /* guest-physical 2 MiB */
    mov edi, 0
    jmp exit                         /* kvmkit's debug-exit port: status 0 */
"""
LOAD = """
    mov rax, [0x200000]
    mov dx, PORT_POST
    out dx, al                       /* one byte of what the guest reads */
    jmp park
"""


def test_a_store_lands_in_guest_memfd(guest_asm, vm_factory):
    machine = vm_factory(guest_asm(STORE), memory="16M", memory_backend="guest_memfd")
    assert machine.run().status == 0
    assert machine.memory.backend_name == "guest_memfd"
    assert bytes(machine.memory.file_view(0x200000, 6)) == b"tikmvk"


def test_after_a_punch_the_guest_reads_zeros(guest_asm, vm_factory):
    machine = vm_factory(guest_asm(LOAD), memory="16M", memory_backend="guest_memfd")
    machine.memory.write(0x200000, b"\x5a")
    machine.memory.discard(0x200000, 4096)
    machine.run()
    assert (machine.post.writes, machine.post.last) == (1, 0)  # 0x5a is gone
