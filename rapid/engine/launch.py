"""The process topology of each mode, declared in one place.

    topology        processes (start stage)                            owns an arena     maps an arena
    hybrid          none: the core and its executor run in the user's process (rapid.engine.inproc)
    hybrid-process  core (0), with the model and its executor          -                 -
    rapid           decode (0), prefill (1), core (1)                  decode            prefill -> decode's
    rapid-2prefill  decode (0), prefill (1), prefill2 (1), core (1)    decode            prefill, prefill2 -> decode's
    disagg          prefill (0, GPU 0), decode (1, GPU 1), core (2)    prefill, decode   decode -> prefill's

Every child is spawned at once (a fresh interpreter, `python -m rapid.engine.child ROLE`, whose imports
overlap), but a stage gets its WorkerArgs (msgspec-encoded on stdin) only once the previous stage is
ready (an importer needs the owner's published handle); stages stop in reverse (importers first, the
owner of a mapped arena last). A restart after a death stops them all and starts them all again.
"""

from __future__ import annotations

from dataclasses import dataclass

from rapid.config import EngineConfig
from rapid.protocol.worker import WorkerReady


@dataclass(frozen=True)
class Role:
    name: str  # "decode" | "prefill" | "prefill2" | "core"
    stage: int  # start order; stopped in reverse
    maps: str | None = None  # the role whose arena this one maps
    gpu: int | None = None  # the CUDA device index of this role when it has its own GPU


TOPOLOGY: dict[str, tuple[Role, ...]] = {
    "hybrid": (),
    "hybrid-process": (Role("core", 0),),
    "rapid": (Role("decode", 0), Role("prefill", 1, maps="decode"), Role("core", 1)),
    "rapid-2prefill": (Role("decode", 0), Role("prefill", 1, maps="decode"), Role("prefill2", 1, maps="decode"),
                       Role("core", 1)),
    "disagg": (Role("prefill", 0, gpu=0), Role("decode", 1, maps="prefill", gpu=1), Role("core", 2)),
}
# whose KV pools the core's block managers account for: (prefill-lane pool, separate decode pool or None)
POOL_OWNERS: dict[str, tuple[str, str | None]] = {"rapid": ("decode", None), "rapid-2prefill": ("decode", None),
                                                  "disagg": ("prefill", "decode")}


def topology(config: EngineConfig) -> str:
    """The TOPOLOGY entry of a config: its mode; 'hybrid-process' for hybrid with engine_process, 'rapid-2prefill'
    for rapid with a second prefill worker."""
    if config.mode == "hybrid" and config.engine_process:
        return "hybrid-process"
    if config.mode == "rapid" and config.rapid.second_prefill_sm_percentage is not None:
        return "rapid-2prefill"
    return config.mode


def workers(config: EngineConfig) -> tuple[str, ...]:
    """The roles of a config's topology that run the model beside the core (each reads its own `ROLE_in`)."""
    return tuple(r.name for r in TOPOLOGY[topology(config)] if r.name != "core")


def stages(topology_name: str) -> list[list[Role]]:
    """The roles of a topology grouped by start stage, in start order."""
    roles = TOPOLOGY[topology_name]
    return [[r for r in roles if r.stage == s] for s in sorted({r.stage for r in roles})]


def stop_order(topology_name: str) -> list[list[str]]:
    return [[r.name for r in stage] for stage in reversed(stages(topology_name))]


def spawn_fields(topology_name: str, role: Role, ready: dict[str, WorkerReady]) -> dict:
    """The WorkerArgs fields a role needs from the processes already started (arena handles, pool sizes)."""
    if role.name == "core" and topology_name not in POOL_OWNERS:
        return {}  # hybrid-process: the core sizes the pool of the model it runs
    if role.name == "core":
        prefill_pool, decode_pool = POOL_OWNERS[topology_name]
        return {"num_blocks": ready[prefill_pool].num_blocks,
                "peer_num_blocks": ready[decode_pool].num_blocks if decode_pool else 0}
    if role.maps is not None:
        return {"arena": ready[role.maps].arena, "num_blocks": ready[role.maps].num_blocks}
    return {}


def devices(config: EngineConfig, cuda: bool) -> dict[str, str]:
    """The device of each role that has a GPU of its own (disagg on CUDA); ValueError if too few GPUs."""
    wanted = {r.name: r.gpu for r in TOPOLOGY[topology(config)] if r.gpu is not None}
    if not wanted or not cuda:
        return {}
    import torch

    if torch.cuda.device_count() <= max(wanted.values()):
        raise ValueError(f"mode {config.mode!r} needs {max(wanted.values()) + 1} GPUs (prefill on one, decode on "
                         f"another); torch sees {torch.cuda.device_count()}")
    return {name: f"cuda:{gpu}" for name, gpu in wanted.items()}
