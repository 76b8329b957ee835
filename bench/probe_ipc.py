"""Probe: are kernel launches asynchronous in a process that mapped a CUDA IPC arena?"""
import subprocess, sys, time, msgspec, torch
CHILD = r'''
import sys, time, msgspec, torch
from rapid.runtime.shared import ArenaHandle, SharedArena
variant = sys.argv[1]
handle = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=ArenaHandle)
dev = torch.device("cuda", 0)
if variant == "noevent":
    handle = ArenaHandle(handle.kind, handle.nbytes, cuda_args=list(handle.cuda_args[:7]) + [False])
if variant != "noarena":
    arena = SharedArena.open(handle, dev)
else:
    torch.cuda.set_device(dev)
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
s = torch.cuda.Stream() if variant == "stream" else torch.cuda.current_stream()
with torch.cuda.stream(s):
    torch.mm(a, a); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(300):
        torch.mm(a, a)
    t1 = time.perf_counter()
    q = s.query()
torch.cuda.synchronize()
print(f"{variant}: launch {1e3*(t1-t0):.1f} ms, query {q}, total {1e3*(time.perf_counter()-t0):.1f} ms", flush=True)
'''
from rapid.runtime.shared import SharedArena
arena = SharedArena.create(1 << 22, torch.device("cuda", 0))
print("event_sync_required", arena.handle.cuda_args[7])
for variant in ("noarena", "event", "noevent", "stream"):
    p = subprocess.run([sys.executable, "-c", CHILD, variant], input=msgspec.msgpack.encode(arena.handle), capture_output=True)
    print(p.stdout.decode().strip(), p.stderr.decode()[-800:] if p.returncode else "")
