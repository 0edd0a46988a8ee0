/*
 * Tiny x86-64 Linux system-call layer for the kvmkit test init: no libc.
 * Every wrapper returns the raw kernel result (a negative errno on failure).
 */
#ifndef KVMKIT_SYS_H
#define KVMKIT_SYS_H

typedef unsigned long size_t;
typedef long ssize_t;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_mmap 9
#define SYS_munmap 11
#define SYS_ioctl 16
#define SYS_pread64 17
#define SYS_pwrite64 18
#define SYS_dup2 33
#define SYS_nanosleep 35
#define SYS_socket 41
#define SYS_connect 42
#define SYS_accept 43
#define SYS_sendto 44
#define SYS_recvfrom 45
#define SYS_shutdown 48
#define SYS_bind 49
#define SYS_listen 50
#define SYS_setsockopt 54
#define SYS_exit 60
#define SYS_fsync 74
#define SYS_sysinfo 99
#define SYS_sync 162
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_getdents64 217
#define SYS_clock_gettime 228
#define SYS_openat 257
#define SYS_ppoll 271

#define AT_FDCWD (-100)
#define O_RDONLY 0
#define O_WRONLY 1
#define O_RDWR 2
#define O_NOCTTY 0400
#define O_DIRECT 040000
#define O_DIRECTORY 0200000
#define O_CLOEXEC 02000000

#define PROT_READ 1
#define PROT_WRITE 2
#define MAP_PRIVATE 2
#define MAP_ANONYMOUS 0x20

#define POLLIN 1
#define POLLOUT 4
#define POLLERR 8
#define POLLHUP 0x10

#define CLOCK_MONOTONIC 1

#define AF_INET 2
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define SOL_SOCKET 1
#define SO_REUSEADDR 2
#define MSG_DONTWAIT 0x40
#define MSG_NOSIGNAL 0x4000
#define SHUT_WR 1
#define VMADDR_CID_ANY 0xffffffffU

#define TCGETS 0x5401
#define TCSETS 0x5402
#define ECHO 0000010
#define ECHONL 0000100
#define BLKGETSIZE64 0x80081272UL
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define SIOCSIFADDR 0x8916
#define SIOCSIFNETMASK 0x891c
#define IFF_UP 0x1

#define LINUX_REBOOT_MAGIC1 0xfee1deadUL
#define LINUX_REBOOT_MAGIC2 672274793UL
#define LINUX_REBOOT_CMD_RESTART 0x01234567UL
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedcUL

struct timespec { long tv_sec; long tv_nsec; };
struct pollfd { int fd; short events; short revents; };
struct termios {
	u32 c_iflag, c_oflag, c_cflag, c_lflag;
	u8 c_line;
	u8 c_cc[19];
};
struct sockaddr_in { u16 sin_family; u16 sin_port; u32 sin_addr; u8 sin_zero[8]; };
struct sockaddr_vm {
	u16 svm_family; u16 svm_reserved1; u32 svm_port; u32 svm_cid;
	u8 svm_flags; u8 svm_zero[3];
};
struct ifreq {
	char ifr_name[16];
	union { struct sockaddr_in addr; short flags; u8 pad[24]; } u;
};
struct sysinfo {
	long uptime; unsigned long loads[3];
	unsigned long totalram, freeram, sharedram, bufferram, totalswap, freeswap;
	u16 procs, pad; unsigned long totalhigh, freehigh; u32 mem_unit;
	char _f[20 - 2 * sizeof(long) - sizeof(int)];
};
struct dirent64 { u64 d_ino; long d_off; u16 d_reclen; u8 d_type; char d_name[]; };

static inline long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	register long r10 asm("r10") = d;
	register long r8 asm("r8") = e;
	register long r9 asm("r9") = f;
	long ret;

	asm volatile("syscall"
		     : "=a"(ret)
		     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
		     : "rcx", "r11", "memory");
	return ret;
}

#define sys0(n) sys6(n, 0, 0, 0, 0, 0, 0)
#define sys1(n, a) sys6(n, (long)(a), 0, 0, 0, 0, 0)
#define sys2(n, a, b) sys6(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sys4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define sys5(n, a, b, c, d, e) \
	sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

#endif
