/* The reference for benchmarks/exit_roundtrip.py: the smallest KVM_RUN loop that
 * runs kvmkit's exitloop guest. Built as a shared object and called from the
 * benchmark in the same process, because a vCPU fd only works in the process
 * that created its VM. */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <sys/ioctl.h>

#define PORT_POST 0x80
#define PORT_DEBUG_EXIT 0x501

static volatile uint8_t last_post;

/* Returns the number of exits taken until the guest wrote the debug-exit port,
 * or a negative value: -errno, -1000 - unexpected exit reason, -100000 - port. */
long run_loop(int vcpu_fd, struct kvm_run *run)
{
	long exits = 0;

	for (;;) {
		if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		exits++;
		if (run->exit_reason != KVM_EXIT_IO)
			return -1000 - (long)run->exit_reason;
		if (run->io.port == PORT_DEBUG_EXIT)
			return exits;
		if (run->io.port != PORT_POST)
			return -100000 - (long)run->io.port;
		last_post = *((uint8_t *)run + run->io.data_offset);
	}
}
