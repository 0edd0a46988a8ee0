/*
 * kvmkit-init: PID 1 of the kvmkit test kernel's initramfs.
 *
 * Static, no libc (sys.h holds the system calls). Mounts devtmpfs, proc and
 * sysfs, takes /dev/ttyS0 (else the inherited /dev/console) with echo off,
 * prints "kvmkit-init: ready cpus=<n>", then runs the command given as
 * kvmkit.cmd="..." on the kernel command line and powers off, or else reads
 * commands from the console one line at a time, forever. Every command ends
 * with "kvmkit-init: done rc=<n>", after "kvmkit-init: error <what>: <errno>"
 * when it failed. The command list is in the table at the end of this file.
 *
 * This runs on a host where every system call and page fault is emulated
 * (about 0.5 ms and 3 ms): output is buffered and flushed per command, and
 * I/O goes in chunks of up to 1 MiB.
 */
#include "sys.h"
#include "pattern.h"

#define CHUNK (1UL << 20)
#define MAX_ARGS 16
#define LINE_MAX 4096

/* ---------------------------------------------------------------- memory */

void *memset(void *d, int c, size_t n)
{
	u8 *p = d;

	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *p = d;
	const u8 *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}

void *memmove(void *d, const void *s, size_t n)
{
	u8 *p = d;
	const u8 *q = s;

	if (p < q)
		return memcpy(d, s, n);
	while (n--)
		p[n] = q[n];
	return d;
}

static size_t str_len(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

static int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static int str_cmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (u8)*a - (u8)*b;
}

/* ---------------------------------------------------------------- output */

static char outbuf[8192];
static size_t outlen;

static void flush(void)
{
	size_t off = 0;

	while (off < outlen) {
		long n = sys3(SYS_write, 1, outbuf + off, outlen - off);

		if (n <= 0)
			break;
		off += (size_t)n;
	}
	outlen = 0;
}

static void out_mem(const char *s, size_t n)
{
	while (n) {
		size_t room = sizeof(outbuf) - outlen;
		size_t k = n < room ? n : room;

		memcpy(outbuf + outlen, s, k);
		outlen += k;
		s += k;
		n -= k;
		if (outlen == sizeof(outbuf))
			flush();
	}
}

static void out(const char *s)
{
	out_mem(s, str_len(s));
}

static void out_u64(u64 v)
{
	char tmp[24];
	int i = sizeof(tmp);

	do {
		tmp[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	out_mem(tmp + i, sizeof(tmp) - (size_t)i);
}

static void out_hex(const u8 *p, size_t n)
{
	static const char digits[] = "0123456789abcdef";
	char pair[2];

	while (n--) {
		pair[0] = digits[*p >> 4];
		pair[1] = digits[*p++ & 15];
		out_mem(pair, 2);
	}
}

static void out_hex64(u64 v)
{
	u8 be[8];
	int i;

	for (i = 0; i < 8; i++)
		be[i] = (u8)(v >> (56 - 8 * i));
	out_hex(be, 8);
}

/* ---------------------------------------------------------------- errors */

static const struct { int no; const char *name; } errnames[] = {
	{1, "EPERM"}, {2, "ENOENT"}, {3, "ESRCH"}, {4, "EINTR"}, {5, "EIO"},
	{6, "ENXIO"}, {7, "E2BIG"}, {8, "ENOEXEC"}, {9, "EBADF"}, {11, "EAGAIN"},
	{12, "ENOMEM"}, {13, "EACCES"}, {14, "EFAULT"}, {16, "EBUSY"}, {17, "EEXIST"},
	{19, "ENODEV"}, {20, "ENOTDIR"}, {21, "EISDIR"}, {22, "EINVAL"}, {23, "ENFILE"},
	{24, "EMFILE"}, {25, "ENOTTY"}, {27, "EFBIG"}, {28, "ENOSPC"}, {29, "ESPIPE"},
	{30, "EROFS"}, {32, "EPIPE"}, {34, "ERANGE"}, {38, "ENOSYS"}, {88, "ENOTSOCK"},
	{95, "EOPNOTSUPP"}, {97, "EAFNOSUPPORT"}, {98, "EADDRINUSE"},
	{99, "EADDRNOTAVAIL"}, {100, "ENETDOWN"}, {101, "ENETUNREACH"},
	{103, "ECONNABORTED"}, {104, "ECONNRESET"}, {105, "ENOBUFS"}, {107, "ENOTCONN"},
	{110, "ETIMEDOUT"}, {111, "ECONNREFUSED"}, {113, "EHOSTUNREACH"},
};

/* Print "kvmkit-init: error WHAT: ENAME" for a negative kernel return; give 1. */
static int fail(const char *what, long err)
{
	size_t i;

	out("kvmkit-init: error ");
	out(what);
	out(": ");
	for (i = 0; i < sizeof(errnames) / sizeof(errnames[0]); i++) {
		if (errnames[i].no == -err) {
			out(errnames[i].name);
			out("\n");
			return 1;
		}
	}
	out("errno ");
	out_u64((u64)-err);
	out("\n");
	return 1;
}

static int usage(const char *text)
{
	out("kvmkit-init: error usage: ");
	out(text);
	out(": EINVAL\n");
	return 2;
}

/* ---------------------------------------------------------------- helpers */

static int parse_u64(const char *s, u64 *v)
{
	u64 r = 0;

	if (!s || !*s)
		return 0;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || r > (~0ULL - 9) / 10)
			return 0;
		r = r * 10 + (u64)(*s - '0');
	}
	*v = r;
	return 1;
}

static long open_path(const char *path, int flags)
{
	return sys4(SYS_openat, AT_FDCWD, path, flags | O_CLOEXEC, 0);
}

/* Read a whole small file into buf (NUL-terminated); the length or -errno. */
static long read_file(const char *path, char *buf, size_t size)
{
	long fd = open_path(path, O_RDONLY), n, got = 0;

	if (fd < 0)
		return fd;
	while ((size_t)got < size - 1) {
		n = sys3(SYS_read, fd, buf + got, size - 1 - (size_t)got);
		if (n < 0) {
			sys1(SYS_close, fd);
			return n;
		}
		if (n == 0)
			break;
		got += n;
	}
	buf[got] = 0;
	sys1(SYS_close, fd);
	return got;
}

static u64 now_ns(void)
{
	struct timespec ts;

	sys2(SYS_clock_gettime, CLOCK_MONOTONIC, &ts);
	return (u64)ts.tv_sec * 1000000000ULL + (u64)ts.tv_nsec;
}

static void sleep_ms(u64 ms)
{
	struct timespec ts = { (long)(ms / 1000), (long)(ms % 1000) * 1000000L };

	while (sys2(SYS_nanosleep, &ts, &ts) == -4)
		;
}

static u8 *io_buffer;

/* The 1 MiB I/O buffer (page-aligned, as O_DIRECT needs), mapped on first use. */
static u8 *iobuf(void)
{
	if (!io_buffer) {
		long p = sys6(SYS_mmap, 0, CHUNK, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p < 0 && p > -4096)
			return 0;
		io_buffer = (u8 *)p;
	}
	return io_buffer;
}

/* Online CPUs from a list such as "0-1" or "0,2-3". */
static u64 online_cpus(void)
{
	char buf[256];
	u64 count = 0, a = 0, b;
	const char *p = buf;

	if (read_file("/sys/devices/system/cpu/online", buf, sizeof(buf)) <= 0)
		return 0;
	while (*p >= '0' && *p <= '9') {
		for (a = 0; *p >= '0' && *p <= '9'; p++)
			a = a * 10 + (u64)(*p - '0');
		b = a;
		if (*p == '-')
			for (b = 0, p++; *p >= '0' && *p <= '9'; p++)
				b = b * 10 + (u64)(*p - '0');
		count += b >= a ? b - a + 1 : 0;
		if (*p == ',')
			p++;
	}
	return count;
}

/* ---------------------------------------------------------------- console input */

static char inbuf[LINE_MAX];
static size_t inlen;

static int line_pending(void)
{
	size_t i;

	for (i = 0; i < inlen; i++)
		if (inbuf[i] == '\n')
			return 1;
	return inlen == sizeof(inbuf);
}

/* The next console line without its end (CR/LF stripped); blocks. */
static void read_line(char *line)
{
	for (;;) {
		size_t i;

		for (i = 0; i < inlen; i++) {
			if (inbuf[i] == '\n' || i == sizeof(inbuf) - 1) {
				size_t n = i;

				while (n && inbuf[n - 1] == '\r')
					n--;
				memcpy(line, inbuf, n);
				line[n] = 0;
				inlen -= i + 1;
				memmove(inbuf, inbuf + i + 1, inlen);
				return;
			}
		}
		long n = sys3(SYS_read, 0, inbuf + inlen, sizeof(inbuf) - inlen);

		if (n > 0)
			inlen += (size_t)n;
		else
			sleep_ms(1000); /* EOF or error on the console: never spin, never exit */
	}
}

/* Wait up to timeout_ns for a console line; consume it and return 1 if one came. */
static int wait_line(u64 timeout_ns)
{
	char discard[LINE_MAX];
	struct pollfd pfd = { 0, POLLIN, 0 };
	struct timespec ts = { (long)(timeout_ns / 1000000000ULL),
			       (long)(timeout_ns % 1000000000ULL) };

	if (!line_pending()) {
		if (sys5(SYS_ppoll, &pfd, 1, &ts, 0, 8) <= 0)
			return 0;
		long n = sys3(SYS_read, 0, inbuf + inlen, sizeof(inbuf) - inlen);

		if (n > 0)
			inlen += (size_t)n;
		if (!line_pending())
			return 0;
	}
	read_line(discard);
	return 1;
}

/* ---------------------------------------------------------------- commands */

static int cmd_echo(int argc, char **argv)
{
	int i;

	for (i = 1; i < argc; i++) {
		if (i > 1)
			out(" ");
		out(argv[i]);
	}
	out("\n");
	return 0;
}

/* Copy a file to the console; make sure the output ends with a newline. */
static int cat_path(const char *path)
{
	char buf[4096];
	long fd = open_path(path, O_RDONLY), n;
	char last = '\n';

	if (fd < 0)
		return fail(path, fd);
	while ((n = sys3(SYS_read, fd, buf, sizeof(buf))) > 0) {
		out_mem(buf, (size_t)n);
		last = buf[n - 1];
	}
	sys1(SYS_close, fd);
	if (last != '\n')
		out("\n");
	return n < 0 ? fail(path, n) : 0;
}

static int cmd_cat(int argc, char **argv)
{
	if (argc != 2)
		return usage("cat PATH");
	return cat_path(argv[1]);
}

static int cmd_cmdline(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return cat_path("/proc/cmdline");
}

static int cmd_cpus(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	out("cpus=");
	out_u64(online_cpus());
	out("\n");
	return 0;
}

static int cmd_ls(int argc, char **argv)
{
	static char names[16384];
	static char *sorted[512];
	char dents[4096];
	size_t used = 0, count = 0, i, j;
	long fd, n;

	if (argc != 2)
		return usage("ls PATH");
	fd = open_path(argv[1], O_RDONLY | O_DIRECTORY);
	if (fd < 0)
		return fail(argv[1], fd);
	while ((n = sys3(SYS_getdents64, fd, dents, sizeof(dents))) > 0) {
		for (long off = 0; off < n;) {
			struct dirent64 *d = (struct dirent64 *)(dents + off);
			size_t len = str_len(d->d_name);

			off += d->d_reclen;
			if (str_eq(d->d_name, ".") || str_eq(d->d_name, ".."))
				continue;
			if (count == sizeof(sorted) / sizeof(sorted[0]) ||
			    used + len + 1 > sizeof(names))
				continue;
			memcpy(names + used, d->d_name, len + 1);
			sorted[count++] = names + used;
			used += len + 1;
		}
	}
	sys1(SYS_close, fd);
	if (n < 0)
		return fail(argv[1], n);
	for (i = 1; i < count; i++)
		for (j = i; j && str_cmp(sorted[j - 1], sorted[j]) > 0; j--) {
			char *t = sorted[j];

			sorted[j] = sorted[j - 1];
			sorted[j - 1] = t;
		}
	for (i = 0; i < count; i++) {
		out(sorted[i]);
		out("\n");
	}
	return 0;
}

static int cmd_heartbeat(int argc, char **argv)
{
	u64 count, period, i, start;

	if (argc != 3 || !parse_u64(argv[1], &count) || !parse_u64(argv[2], &period))
		return usage("heartbeat COUNT PERIOD_MS");
	start = now_ns();
	for (i = 1; count == 0 || i <= count; i++) {
		u64 due = start + i * period * 1000000ULL, t = now_ns();

		if (count == 0) {
			if (wait_line(due > t ? due - t : 0))
				break;
		} else if (due > t) {
			sleep_ms((due - t) / 1000000ULL);
		}
		out("hb ");
		out_u64(i);
		out("\n");
		flush();
	}
	return 0;
}

static int cmd_sleep(int argc, char **argv)
{
	u64 ms;

	if (argc != 2 || !parse_u64(argv[1], &ms))
		return usage("sleep MS");
	flush();
	sleep_ms(ms);
	return 0;
}

static int cmd_meminfo(int argc, char **argv)
{
	struct sysinfo si;
	long r;

	(void)argc;
	(void)argv;
	memset(&si, 0, sizeof(si));
	r = sys1(SYS_sysinfo, &si);
	if (r < 0)
		return fail("sysinfo", r);
	out("memtotal_kb=");
	out_u64((u64)si.totalram * si.mem_unit / 1024);
	out(" memfree_kb=");
	out_u64((u64)si.freeram * si.mem_unit / 1024);
	out("\n");
	return 0;
}

static struct { u8 *addr; u64 len; } kept[64];
static int nkept;

static int cmd_mem_touch(int argc, char **argv)
{
	u64 mib, len, off;
	long p;

	if (argc != 2 || !parse_u64(argv[1], &mib) || mib == 0 || mib > (1ULL << 20))
		return usage("mem-touch MIB (1 or more)");
	if (nkept == (int)(sizeof(kept) / sizeof(kept[0])))
		return fail("mem-touch (64 regions kept: run mem-free)", -12);
	len = mib << 20;
	p = sys6(SYS_mmap, 0, (long)len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		 -1, 0);
	if (p < 0 && p > -4096)
		return fail("mmap", p);
	for (off = 0; off < len; off += 4096)
		((volatile u8 *)p)[off] = 0xa5;
	kept[nkept].addr = (u8 *)p;
	kept[nkept++].len = len;
	out("touched=");
	out_u64(mib);
	out("\n");
	return 0;
}

static int cmd_mem_free(int argc, char **argv)
{
	u64 freed = 0;
	long r;

	(void)argc;
	(void)argv;
	while (nkept) {
		nkept--;
		r = sys2(SYS_munmap, kept[nkept].addr, kept[nkept].len);
		if (r < 0)
			return fail("munmap", r);
		freed += kept[nkept].len;
	}
	out("freed=");
	out_u64(freed >> 20);
	out("\n");
	return 0;
}

static void done(int rc);

static int power(u64 cmd, const char *what)
{
	long r;

	done(0);
	sys0(SYS_sync);
	r = sys4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, cmd, 0);
	return fail(what, r);
}

static int cmd_poweroff(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return power(LINUX_REBOOT_CMD_POWER_OFF, "reboot(POWER_OFF)");
}

static int cmd_reboot(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return power(LINUX_REBOOT_CMD_RESTART, "reboot(RESTART)");
}

static int cmd_panic(int argc, char **argv)
{
	long fd = open_path("/proc/sysrq-trigger", O_WRONLY), r;

	(void)argc;
	(void)argv;
	if (fd < 0)
		return fail("/proc/sysrq-trigger", fd);
	done(0);
	r = sys3(SYS_write, fd, "c", 1);
	sys1(SYS_close, fd);
	return fail("write /proc/sysrq-trigger", r < 0 ? r : -5);
}

static int cmd_exit(int argc, char **argv)
{
	u64 status;

	if (argc != 2 || !parse_u64(argv[1], &status) || status > 255)
		return usage("exit N (0-255)");
	done(0);
	for (;;)
		sys1(SYS_exit, (long)status);
}

static long open_dev(const char *dev, int flags, const char *what)
{
	long fd = open_path(dev, flags);

	if (fd < 0)
		fail(what, fd);
	return fd;
}

static int cmd_blk_size(int argc, char **argv)
{
	u64 size = 0;
	long fd, r;

	if (argc != 2)
		return usage("blk-size DEV");
	fd = open_dev(argv[1], O_RDONLY, argv[1]);
	if (fd < 0)
		return 1;
	r = sys3(SYS_ioctl, fd, BLKGETSIZE64, &size);
	sys1(SYS_close, fd);
	if (r < 0)
		return fail("BLKGETSIZE64", r);
	out("bytes=");
	out_u64(size);
	out("\n");
	return 0;
}

/* Offset and length checks for O_DIRECT; 0 when usable. */
static int blk_args(int argc, char **argv, int want, u64 *offset, u64 *len, const char *text)
{
	if (argc != want || !parse_u64(argv[2], offset) || !parse_u64(argv[3], len))
		return usage(text);
	if (*offset % 512 || *len % 512)
		return fail("O_DIRECT needs OFFSET and LEN in multiples of 512", -22);
	return 0;
}

static int cmd_blk_write(int argc, char **argv)
{
	u64 offset, len, seed, done_bytes = 0, h = FNV64_OFFSET;
	struct pattern pat;
	long fd, r;
	u8 *buf = iobuf();
	int rc = blk_args(argc, argv, 5, &offset, &len, "blk-write DEV OFFSET LEN SEED");

	if (rc)
		return rc;
	if (!parse_u64(argv[4], &seed))
		return usage("blk-write DEV OFFSET LEN SEED");
	if (!buf)
		return fail("mmap", -12);
	fd = open_dev(argv[1], O_WRONLY | O_DIRECT, argv[1]);
	if (fd < 0)
		return 1;
	pattern_init(&pat, seed);
	while (done_bytes < len) {
		u64 n = len - done_bytes < CHUNK ? len - done_bytes : CHUNK;

		pattern_fill(&pat, buf, n);
		h = fnv1a64_update(h, buf, n);
		r = sys4(SYS_pwrite64, fd, buf, n, offset + done_bytes);
		if (r != (long)n) {
			sys1(SYS_close, fd);
			return fail("pwrite", r < 0 ? r : -28);
		}
		done_bytes += n;
	}
	sys1(SYS_close, fd);
	out("written=");
	out_u64(len);
	out(" fnv=");
	out_hex64(h);
	out("\n");
	return 0;
}

static int cmd_blk_read(int argc, char **argv)
{
	u64 offset, len, done_bytes = 0, h = FNV64_OFFSET;
	long fd, r;
	u8 *buf = iobuf();
	int rc = blk_args(argc, argv, 4, &offset, &len, "blk-read DEV OFFSET LEN");

	if (rc)
		return rc;
	if (!buf)
		return fail("mmap", -12);
	fd = open_dev(argv[1], O_RDONLY | O_DIRECT, argv[1]);
	if (fd < 0)
		return 1;
	while (done_bytes < len) {
		u64 n = len - done_bytes < CHUNK ? len - done_bytes : CHUNK;

		r = sys4(SYS_pread64, fd, buf, n, offset + done_bytes);
		if (r != (long)n) {
			sys1(SYS_close, fd);
			return fail("pread", r < 0 ? r : -5);
		}
		h = fnv1a64_update(h, buf, n);
		done_bytes += n;
	}
	sys1(SYS_close, fd);
	out("read=");
	out_u64(len);
	out(" fnv=");
	out_hex64(h);
	out("\n");
	return 0;
}

static int cmd_blk_flush(int argc, char **argv)
{
	long fd, r;

	if (argc != 2)
		return usage("blk-flush DEV");
	fd = open_dev(argv[1], O_WRONLY, argv[1]);
	if (fd < 0)
		return 1;
	r = sys1(SYS_fsync, fd);
	sys1(SYS_close, fd);
	return r < 0 ? fail("fsync", r) : 0;
}

static int cmd_rng(int argc, char **argv)
{
	u8 buf[2048];
	u64 n, got = 0;
	long fd, r;

	if (argc != 2 || !parse_u64(argv[1], &n) || n == 0 || n > sizeof(buf))
		return usage("rng N (1-2048)");
	fd = open_dev("/dev/hwrng", O_RDONLY, "/dev/hwrng");
	if (fd < 0)
		return 1;
	while (got < n) {
		r = sys3(SYS_read, fd, buf + got, n - got);
		if (r <= 0) {
			sys1(SYS_close, fd);
			return fail("read /dev/hwrng", r < 0 ? r : -5);
		}
		got += (u64)r;
	}
	sys1(SYS_close, fd);
	out("rng=");
	out_hex(buf, n);
	out("\n");
	return 0;
}

/* "a.b.c.d" to a network-order address; 1 on success. */
static int parse_ip(const char *s, u32 *ip)
{
	u32 parts[4];
	int i;

	for (i = 0; i < 4; i++) {
		u64 v = 0;
		int digits = 0;

		for (; *s >= '0' && *s <= '9' && digits < 4; s++, digits++)
			v = v * 10 + (u64)(*s - '0');
		if (!digits || v > 255)
			return 0;
		parts[i] = (u32)v;
		if (i < 3 && *s++ != '.')
			return 0;
	}
	if (*s && *s != '/')
		return 0;
	*ip = parts[0] | parts[1] << 8 | parts[2] << 16 | parts[3] << 24;
	return 1;
}

static u16 be16(u64 v)
{
	return (u16)(((v & 0xff) << 8) | ((v >> 8) & 0xff));
}

static int cmd_net_up(int argc, char **argv)
{
	struct ifreq ifr;
	u32 ip, mask;
	u64 prefix;
	const char *slash;
	long fd, r;

	if (argc != 3 || str_len(argv[1]) >= sizeof(ifr.ifr_name) || !parse_ip(argv[2], &ip))
		return usage("net-up IFACE IP/PREFIX");
	for (slash = argv[2]; *slash && *slash != '/'; slash++)
		;
	if (!*slash || !parse_u64(slash + 1, &prefix) || prefix > 32)
		return usage("net-up IFACE IP/PREFIX");
	mask = prefix ? ~0U << (32 - prefix) : 0;
	mask = (mask >> 24) | ((mask >> 8) & 0xff00) | ((mask << 8) & 0xff0000) | (mask << 24);
	fd = sys3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		return fail("socket", fd);
	memset(&ifr, 0, sizeof(ifr));
	memcpy(ifr.ifr_name, argv[1], str_len(argv[1]));
	ifr.u.addr.sin_family = AF_INET;
	ifr.u.addr.sin_addr = ip;
	r = sys3(SYS_ioctl, fd, SIOCSIFADDR, &ifr);
	if (r < 0)
		goto out_fail_addr;
	ifr.u.addr.sin_addr = mask;
	r = sys3(SYS_ioctl, fd, SIOCSIFNETMASK, &ifr);
	if (r < 0) {
		sys1(SYS_close, fd);
		return fail("SIOCSIFNETMASK", r);
	}
	memset(&ifr.u, 0, sizeof(ifr.u));
	r = sys3(SYS_ioctl, fd, SIOCGIFFLAGS, &ifr);
	if (r >= 0) {
		ifr.u.flags |= IFF_UP;
		r = sys3(SYS_ioctl, fd, SIOCSIFFLAGS, &ifr);
	}
	sys1(SYS_close, fd);
	return r < 0 ? fail("SIOCSIFFLAGS", r) : 0;
out_fail_addr:
	sys1(SYS_close, fd);
	return fail("SIOCSIFADDR", r);
}

/* Send len pattern bytes on a blocking socket; the FNV-1a of what was sent or 0 + *err. */
static u64 send_pattern(long fd, u64 len, u64 seed, long *err)
{
	struct pattern pat;
	u64 sent = 0, h = FNV64_OFFSET;
	u8 *buf = iobuf();

	*err = buf ? 0 : -12;
	pattern_init(&pat, seed);
	while (!*err && sent < len) {
		u64 n = len - sent < CHUNK ? len - sent : CHUNK, off = 0;

		pattern_fill(&pat, buf, n);
		h = fnv1a64_update(h, buf, n);
		while (off < n) {
			long r = sys6(SYS_sendto, fd, (long)(buf + off), n - off, MSG_NOSIGNAL, 0, 0);

			if (r <= 0) {
				*err = r < 0 ? r : -32;
				break;
			}
			off += (u64)r;
		}
		sent += n;
	}
	return h;
}

/* Read to EOF; the byte count, FNV-1a in *h; -errno on failure. */
static long recv_all(long fd, u64 *h, long echo_fd)
{
	u8 *buf = iobuf();
	long total = 0, n;

	*h = FNV64_OFFSET;
	if (!buf)
		return -12;
	while ((n = sys3(SYS_read, fd, buf, CHUNK)) > 0) {
		*h = fnv1a64_update(*h, buf, (u64)n);
		total += n;
		for (long off = 0; echo_fd >= 0 && off < n;) {
			long w = sys6(SYS_sendto, echo_fd, (long)(buf + off), n - off, MSG_NOSIGNAL, 0, 0);

			if (w <= 0)
				return w < 0 ? w : -32;
			off += w;
		}
	}
	return n < 0 ? n : total;
}

static int cmd_tcp_send(int argc, char **argv)
{
	struct sockaddr_in sa;
	u64 port, len, seed, h;
	long fd, r;

	memset(&sa, 0, sizeof(sa));
	if (argc != 5 || !parse_ip(argv[1], &sa.sin_addr) || !parse_u64(argv[2], &port) ||
	    port > 65535 || !parse_u64(argv[3], &len) || !parse_u64(argv[4], &seed))
		return usage("tcp-send IP PORT LEN SEED");
	sa.sin_family = AF_INET;
	sa.sin_port = be16(port);
	fd = sys3(SYS_socket, AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return fail("socket", fd);
	r = sys3(SYS_connect, fd, &sa, sizeof(sa));
	if (r < 0) {
		sys1(SYS_close, fd);
		return fail("connect", r);
	}
	h = send_pattern(fd, len, seed, &r);
	sys1(SYS_close, fd);
	if (r < 0)
		return fail("send", r);
	out("sent=");
	out_u64(len);
	out(" fnv=");
	out_hex64(h);
	out("\n");
	return 0;
}

/* Bind, listen and accept one connection; the connected fd or -errno. */
static long accept_one(long fd, const void *sa, u64 salen, const char **what)
{
	int one = 1;
	long r, c;

	sys5(SYS_setsockopt, fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	*what = "bind";
	r = sys3(SYS_bind, fd, sa, salen);
	if (r < 0)
		return r;
	*what = "listen";
	r = sys2(SYS_listen, fd, 1);
	if (r < 0)
		return r;
	flush();
	*what = "accept";
	do
		c = sys3(SYS_accept, fd, 0, 0);
	while (c == -4);
	return c;
}

static int cmd_tcp_recv(int argc, char **argv)
{
	struct sockaddr_in sa;
	const char *what = "socket";
	u64 port, h;
	long fd, c, n;

	if (argc != 2 || !parse_u64(argv[1], &port) || port > 65535)
		return usage("tcp-recv PORT");
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = be16(port);
	fd = sys3(SYS_socket, AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return fail(what, fd);
	c = accept_one(fd, &sa, sizeof(sa), &what);
	sys1(SYS_close, fd);
	if (c < 0)
		return fail(what, c);
	n = recv_all(c, &h, -1);
	sys1(SYS_close, c);
	if (n < 0)
		return fail("read", n);
	out("received=");
	out_u64((u64)n);
	out(" fnv=");
	out_hex64(h);
	out("\n");
	return 0;
}

/*
 * Send len pattern bytes and read everything the peer sends until EOF, both
 * at once (poll): a peer that echoes would otherwise fill both directions'
 * buffers and stall a sender that only writes.
 */
static int cmd_vsock_send(int argc, char **argv)
{
	struct sockaddr_vm sa;
	struct pattern pat;
	u64 cid, port, len, seed, sent = 0, pend_off = 0, pend_len = 0, received = 0;
	u64 h = FNV64_OFFSET, rh = FNV64_OFFSET;
	int wr_open = 1, rd_open = 1;
	const char *what = "send";
	u8 *buf = iobuf(), *tx, *rx;
	long fd, r;

	if (argc != 5 || !parse_u64(argv[1], &cid) || cid > 0xffffffffULL ||
	    !parse_u64(argv[2], &port) || port > 0xffffffffULL || !parse_u64(argv[3], &len) ||
	    !parse_u64(argv[4], &seed))
		return usage("vsock-send CID PORT LEN SEED");
	if (!buf)
		return fail("mmap", -12);
	tx = buf;
	rx = buf + CHUNK / 2;
	memset(&sa, 0, sizeof(sa));
	sa.svm_family = AF_VSOCK;
	sa.svm_port = (u32)port;
	sa.svm_cid = (u32)cid;
	fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0)
		return fail("socket(AF_VSOCK)", fd);
	r = sys3(SYS_connect, fd, &sa, sizeof(sa));
	if (r < 0) {
		sys1(SYS_close, fd);
		return fail("connect", r);
	}
	pattern_init(&pat, seed);
	r = 0;
	while (wr_open || rd_open) {
		struct pollfd pfd = { (int)fd, 0, 0 };

		if (wr_open && sent == len) {
			sys2(SYS_shutdown, fd, SHUT_WR);
			wr_open = 0;
			continue;
		}
		pfd.events = (short)((wr_open ? POLLOUT : 0) | (rd_open ? POLLIN : 0));
		r = sys5(SYS_ppoll, &pfd, 1, 0, 0, 8);
		if (r == -4)
			continue;
		if (r < 0) {
			what = "poll";
			break;
		}
		if (wr_open && (pfd.revents & (POLLOUT | POLLERR | POLLHUP))) {
			if (pend_off == pend_len) {
				pend_len = len - sent < CHUNK / 2 ? len - sent : CHUNK / 2;
				pend_off = 0;
				pattern_fill(&pat, tx, pend_len);
				h = fnv1a64_update(h, tx, pend_len);
			}
			r = sys6(SYS_sendto, fd, (long)(tx + pend_off), pend_len - pend_off,
				 MSG_NOSIGNAL | MSG_DONTWAIT, 0, 0);
			if (r < 0 && r != -11) {
				what = "send";
				break;
			}
			if (r > 0) {
				pend_off += (u64)r;
				sent += (u64)r;
			}
		}
		if (rd_open && (pfd.revents & (POLLIN | POLLERR | POLLHUP))) {
			r = sys6(SYS_recvfrom, fd, (long)rx, CHUNK / 2, MSG_DONTWAIT, 0, 0);
			if (r < 0 && r != -11) {
				what = "recv";
				break;
			}
			if (r == 0)
				rd_open = 0;
			if (r > 0) {
				rh = fnv1a64_update(rh, rx, (u64)r);
				received += (u64)r;
			}
		}
		r = 0;
	}
	sys1(SYS_close, fd);
	if (r < 0)
		return fail(what, r);
	out("sent=");
	out_u64(len);
	out(" fnv=");
	out_hex64(h);
	out(" received=");
	out_u64(received);
	out(" rfnv=");
	out_hex64(rh);
	out("\n");
	return 0;
}

static int cmd_vsock_echo(int argc, char **argv)
{
	struct sockaddr_vm sa;
	const char *what = "socket(AF_VSOCK)";
	u64 port, h;
	long fd, c, n;

	if (argc != 2 || !parse_u64(argv[1], &port) || port > 0xffffffffULL)
		return usage("vsock-echo PORT");
	memset(&sa, 0, sizeof(sa));
	sa.svm_family = AF_VSOCK;
	sa.svm_port = (u32)port;
	sa.svm_cid = VMADDR_CID_ANY;
	fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0)
		return fail(what, fd);
	c = accept_one(fd, &sa, sizeof(sa), &what);
	sys1(SYS_close, fd);
	if (c < 0)
		return fail(what, c);
	n = recv_all(c, &h, c);
	sys1(SYS_close, c);
	if (n < 0)
		return fail("echo", n);
	out("echoed=");
	out_u64((u64)n);
	out(" fnv=");
	out_hex64(h);
	out("\n");
	return 0;
}

static const struct {
	const char *name;
	int (*run)(int argc, char **argv);
} commands[] = {
	{"echo", cmd_echo},
	{"cat", cmd_cat},
	{"cpus", cmd_cpus},
	{"cmdline", cmd_cmdline},
	{"ls", cmd_ls},
	{"heartbeat", cmd_heartbeat},
	{"sleep", cmd_sleep},
	{"meminfo", cmd_meminfo},
	{"mem-touch", cmd_mem_touch},
	{"mem-free", cmd_mem_free},
	{"poweroff", cmd_poweroff},
	{"reboot", cmd_reboot},
	{"panic", cmd_panic},
	{"exit", cmd_exit},
	{"blk-size", cmd_blk_size},
	{"blk-write", cmd_blk_write},
	{"blk-read", cmd_blk_read},
	{"blk-flush", cmd_blk_flush},
	{"rng", cmd_rng},
	{"net-up", cmd_net_up},
	{"tcp-send", cmd_tcp_send},
	{"tcp-recv", cmd_tcp_recv},
	{"vsock-send", cmd_vsock_send},
	{"vsock-echo", cmd_vsock_echo},
};

static void done(int rc)
{
	out("kvmkit-init: done rc=");
	out_u64((u64)rc);
	out("\n");
	flush();
}

/* Split a line on spaces (in place) and run it; print the done line. */
static void run_line(char *line)
{
	char *argv[MAX_ARGS + 1];
	int argc = 0, rc = 127;
	size_t i;

	for (char *p = line; *p;) {
		while (*p == ' ' || *p == '\t')
			*p++ = 0;
		if (!*p)
			break;
		if (argc == MAX_ARGS) {
			argc = -1;
			break;
		}
		argv[argc++] = p;
		while (*p && *p != ' ' && *p != '\t')
			p++;
	}
	if (argc == 0)
		return; /* an empty line is not a command */
	if (argc < 0) {
		done(usage("at most 16 words on a line"));
		return;
	}
	argv[argc] = 0;
	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (str_eq(commands[i].name, argv[0]))
			break;
	if (i < sizeof(commands) / sizeof(commands[0])) {
		rc = commands[i].run(argc, argv);
	} else {
		out("kvmkit-init: error unknown command ");
		out(argv[0]);
		out("\n");
	}
	done(rc);
}

/* kvmkit.cmd="..." or kvmkit.cmd=word from /proc/cmdline into cmd; 1 if present. */
static int cmdline_command(char *cmd, size_t size)
{
	static const char key[] = "kvmkit.cmd=";
	char buf[LINE_MAX];
	long n = read_file("/proc/cmdline", buf, sizeof(buf));
	char *p = buf, *end;

	if (n <= 0)
		return 0;
	for (; *p; p++) {
		size_t k = 0;

		if (p != buf && p[-1] != ' ')
			continue;
		while (key[k] && p[k] == key[k])
			k++;
		if (key[k])
			continue;
		p += k;
		if (*p == '"')
			for (end = ++p; *end && *end != '"'; end++)
				;
		else
			for (end = p; *end && *end != ' ' && *end != '\n'; end++)
				;
		n = end - p;
		if ((size_t)n >= size)
			n = (long)size - 1;
		memcpy(cmd, p, (size_t)n);
		cmd[n] = 0;
		return 1;
	}
	return 0;
}

static void setup_console(void)
{
	struct termios t;
	long fd = open_path("/dev/ttyS0", O_RDWR | O_NOCTTY);

	if (fd >= 0) {
		sys2(SYS_dup2, fd, 0);
		sys2(SYS_dup2, fd, 1);
		sys2(SYS_dup2, fd, 2);
		if (fd > 2)
			sys1(SYS_close, fd);
	}
	if (sys3(SYS_ioctl, 0, TCGETS, &t) == 0) {
		t.c_lflag &= ~(u32)(ECHO | ECHONL);
		sys3(SYS_ioctl, 0, TCSETS, &t);
	}
}

static void mount_fs(const char *src, const char *dir, const char *type)
{
	long r = sys5(SYS_mount, src, dir, type, 0, 0);

	if (r < 0 && r != -16) /* EBUSY: already mounted */
		fail(dir, r);
}

__attribute__((noreturn, used)) void init_main(void)
{
	static char line[LINE_MAX];

	mount_fs("devtmpfs", "/dev", "devtmpfs");
	mount_fs("proc", "/proc", "proc");
	mount_fs("sysfs", "/sys", "sysfs");
	setup_console();
	out("kvmkit-init: ready cpus=");
	out_u64(online_cpus());
	out("\n");
	flush();
	if (cmdline_command(line, sizeof(line))) {
		run_line(line);
		sys0(SYS_sync);
		sys4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
		     LINUX_REBOOT_CMD_POWER_OFF, 0);
	}
	for (;;) {
		read_line(line);
		run_line(line);
	}
}

/* The kernel starts PID 1 here with RSP 16-byte aligned; call with the ABI's alignment. */
asm(".globl _start\n"
    "_start:\n"
    "	xor %ebp, %ebp\n"
    "	and $-16, %rsp\n"
    "	call init_main\n"
    "	ud2\n");
