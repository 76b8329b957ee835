"""Probe: which part of the hand-off test's writer makes its launches wait (see tests/test_gpu_rapid.py)."""
import subprocess, sys, msgspec, torch
CHILD = r'''
import sys, time, msgspec, torch
variant = sys.argv[1]
if variant in ("workers", "workers_nofill"):
    from rapid.worker.process import sync_device as _sync  # noqa: F401
from rapid.worker.arena import ArenaHandle, SharedArena
handle = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=ArenaHandle)
dev = torch.device("cuda", 0)
arena = SharedArena.open(handle, dev)
x = arena.buffer[: 1 << 20].view(torch.float32)
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
torch.mm(a, a); torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(300):
    torch.mm(a, a)
t1 = time.perf_counter()
if not variant.endswith("nofill"):
    x.fill_(7.0)
t2 = time.perf_counter()
q = torch.cuda.current_stream(dev).query()
print(f"{variant}: mm loop {1e3*(t1-t0):.1f} ms, fill {1e3*(t2-t1):.1f} ms, query {q}", flush=True)
'''
from rapid.worker.arena import SharedArena
arena = SharedArena.create(1 << 22, torch.device("cuda", 0))
arena.buffer[: 1 << 20].view(torch.float32).zero_()
torch.cuda.synchronize()
for variant in ("plain", "plain_nofill", "workers", "workers_nofill"):
    p = subprocess.run([sys.executable, "-c", CHILD, variant], input=msgspec.msgpack.encode(arena.handle), capture_output=True)
    print(p.stdout.decode().strip(), p.stderr.decode()[-600:] if p.returncode else "")
