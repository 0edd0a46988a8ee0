"""The 6.18 KVM userspace ABI as data: ctypes structures, constants, ioctl numbers.

Nothing here has behaviour. Submodules:

- `ioctls`: request numbers (`KVM_RUN`, `KVM_CREATE_GUEST_MEMFD`, ...)
- `caps`: `Cap`, the KVM_CHECK_EXTENSION numbers
- `exits`: `ExitReason` and exit sub-codes
- `run`: `kvm_run`
- `memory`, `cpu`, `irq`, `control`: the structures, grouped by what they describe
"""
