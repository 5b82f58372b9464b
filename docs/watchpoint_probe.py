import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_perf_event_open = 298
ADAPTIVE = {11: 184, 12: 192, 13: 200, 14: 208}[sys.version_info[1]]

def body_unit(code):
    import dis
    ops = dis.opmap
    resumes = {v for k, v in dis._all_opmap.items() if 'RESUME' in k} if hasattr(dis, '_all_opmap') else {ops['RESUME']}
    base = id(code) + ADAPTIVE
    for i in range(32):
        op, arg = ctypes.c_uint8.from_address(base + 2*i).value, ctypes.c_uint8.from_address(base + 2*i + 1).value
        if op in resumes and arg == 0:
            return base + 2*i, i, op
    raise SystemExit("no resume")

def watch(addr):
    attr = bytearray(128)
    struct.pack_into('IIQQQQQ', attr, 0, 5, 128, 0, 0, 0, 0, 0)  # type, size, config, sample_period, sample_type, read_format, flags
    # flags: disabled=0, exclude_kernel bit 5 | exclude_hv bit 6
    struct.pack_into('Q', attr, 40, (1 << 5) | (1 << 6))
    struct.pack_into('I', attr, 52, 3)        # bp_type RW (offset 52)
    struct.pack_into('Q', attr, 56, addr)     # bp_addr
    struct.pack_into('Q', attr, 64, 2)        # bp_len
    buf = ctypes.create_string_buffer(bytes(attr))
    fd = libc.syscall(SYS_perf_event_open, buf, 0, -1, -1, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "perf_event_open")
    return fd

def count(fd):
    return struct.unpack('Q', os.read(fd, 8))[0]

def f(x):
    return x + 1

def g(n):
    for i in range(n):
        yield i

def other():
    return 0

for fn, call in [(f, lambda: f(1)), (g, lambda: list(g(3)))]:
    addr, unit, op = body_unit(fn.__code__)
    fd = watch(addr)
    c0 = count(fd)
    for _ in range(1000):
        call()
        other()
    c1 = count(fd)
    import dis
    print(sys.version.split()[0], fn.__name__, "unit", unit, "op", dis.opname[op] if op < len(dis.opname) else op,
          "traps for 1000 starts:", c1 - c0, "now op", ctypes.c_uint8.from_address(addr).value)
    os.close(fd)
