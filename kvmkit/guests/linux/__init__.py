"""kvmkit's Linux test guest: kernel configuration and patches, the test init, the
initramfs writer, the shared data pattern, and the builder (`kvmkit kernel build`)."""
