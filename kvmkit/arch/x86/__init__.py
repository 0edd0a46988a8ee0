"""x86-64 CPU state: long mode, real mode, CPUID, register dumps."""
