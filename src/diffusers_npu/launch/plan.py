"""What the launcher will run: the training flags, the process topology and the command, as lists.

Nothing here runs anything or touches the disk, so the dry run and the tests see exactly the command a real
run executes. The command is a list (values are never re-split by a shell); it is shown with
``shlex.join``, so a printed command pasted into a shell runs the same thing.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..errors import UsageError
from .options import DATA_OPTIONS, MODELZOO_FLAGS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Flags that argparse.BooleanOptionalAction defines, so that False can be said explicitly (--no-NAME).
NEGATABLE = ("learning_check",)
#: torchrun's grace between forwarding a signal to its workers and SIGKILL (its default is 30 s; an SD-sized
#: pre-emption checkpoint needs more: see docs/launching.md#pre-emption)
SHUTDOWN_TIMEOUT_S = 600


def flag_value(argv: Sequence[str], name: str) -> Optional[str]:
    """The value the LAST ``--name`` in ``argv`` gives (argparse's rule), in either ``--name=v`` or
    ``--name v`` form; ``None`` when absent."""
    value = None
    argv = list(argv)
    for i, tok in enumerate(argv):
        if tok.startswith(f"--{name}="):
            value = tok.split("=", 1)[1]
        elif tok == f"--{name}" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
    return value


def has_flag(argv: Sequence[str], name: str) -> bool:
    return any(t == f"--{name}" or t.startswith(f"--{name}=") for t in argv)


def to_tokens(flags: Dict[str, object]) -> List[str]:
    """``{"use_ema": True, "learning_rate": 1e-5, "validation_prompts": ["a", "b"]}`` -> training argv.

    ``--name=value`` keeps a value that starts with '-' from being read as a flag."""
    out: List[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            if value is False and name in NEGATABLE:
                out.append(f"--no-{name}")
            continue
        if value is True:
            out.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            out += [f"--{name}", *map(str, value)]
        else:
            out.append(f"--{name}={value}")
    return out


def read_config(path: Optional[str]) -> dict:
    """The keys of a training ``--config`` file (for the dry run's figures); ``{}`` when unreadable -- the
    trainer, not the launcher, reports a bad config file."""
    if not path or not os.path.isfile(path):
        return {}
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class Topology:
    device: str                      # npu | cuda | cpu
    nproc: int                       # processes on this node
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None  # None on one node: torchrun --standalone picks a free port

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


@dataclass
class Plan:
    task: str
    network: str
    case_suffix: str                 # "acc", or "perf" for the train_performance_* runs
    topology: Topology
    program: List[str]               # the script path, or ["-m", "diffusers_npu.train", TASK]
    train_args: List[str]
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.topology.world

    @property
    def output_dir(self) -> str:
        return flag_value(self.train_args, "output_dir") or "."

    def command(self) -> List[str]:
        t = self.topology
        if t.world == 1:
            return [sys.executable, *self.program, *self.train_args]
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(t.nproc)]
        if t.nnodes == 1 and t.master_port is None:
            run.append("--standalone")
        else:
            run += ["--nnodes", str(t.nnodes), "--node_rank", str(t.node_rank), "--master_addr", t.master_addr,
                    "--master_port", str(t.master_port or 29500)]
        program = self.program
        if program[0] == "-m":  # torchrun spells "python -m MODULE" as "--module MODULE"
            program = ["--module", *program[1:]]
        return run + program + self.train_args

    def shell(self) -> str:
        """The command as one line a shell would run identically (environment assignments first)."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.command())

    def header(self) -> str:
        t = self.topology
        return (f"Network={self.network} devices/node={t.nproc} nodes={t.nnodes} world={t.world} "
                f"device={t.device}")

    def effective(self, name: str, default=None):
        """A training flag's value as the trainer will see it: the command line, else the --config file."""
        value = flag_value(self.train_args, name)
        if value is None:
            value = read_config(flag_value(self.train_args, "config")).get(name)
        return default if value is None else value


class PlanBuilder:
    """Turns the parsed launcher options into :class:`Plan` objects for a given device kind and count.

    Precedence of training flags, lowest first: the task's LaunchProfile (or the --variant), the ModelZoo
    options, the launcher's fixed flags, ``--extra_args``, the flags after ``--`` (argparse keeps the last).
    """

    def __init__(self, args, task_cls, variant=None, environ=None):
        env = os.environ if environ is None else environ
        profile = getattr(task_cls, "launch", None)
        if profile is None:
            raise UsageError(f"task {task_cls.name!r} declares no LaunchProfile, so it cannot be launched")
        if variant is not None and variant.task != task_cls.name:
            raise UsageError(f"--variant {variant.name} is a {variant.task} run, not {task_cls.name}")
        self.args, self.task_cls, self.profile, self.variant = args, task_cls, profile, variant
        try:
            extra = shlex.split(args.extra_args) if args.extra_args else []
        except ValueError as exc:
            raise UsageError(f"--extra_args cannot be split like a shell would ({exc}): {args.extra_args}") from None
        self.passthrough = extra + list(getattr(args, "training_flags", []) or [])
        mode = flag_value(self.passthrough, "distributed") or args.distributed
        if args.zero_stage is not None and mode != "deepspeed":
            raise UsageError(f"--zero_stage={args.zero_stage} applies to --distributed=deepspeed only "
                             f"(got {'--distributed=' + mode if mode else 'no --distributed'})")
        self.network = variant.network if variant else profile.network
        self.case_suffix = variant.case_suffix if variant else "acc"
        self.requested = args.num_devices or (variant.num_devices if variant else 1)
        self.nnodes = args.nnodes or _env_int(env, "NNODES", 1)
        self.node_rank = args.node_rank if args.node_rank is not None else _env_int(env, "NODE_RANK", 0)
        if self.node_rank >= self.nnodes:
            raise UsageError(f"node rank {self.node_rank} is not below the number of nodes {self.nnodes} "
                             f"(--node_rank / $NODE_RANK, --nnodes / $NNODES)")
        self.master_addr = args.master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
        self.master_port = args.master_port or (_env_int(env, "PORT", 0) or None)
        self.device_id = env.get("ASCEND_DEVICE_ID") or "0"
        self.log_dir = os.path.abspath(args.log_dir or os.path.join("output", self.device_id))
        self.embedded = not (args.model_name or (variant is not None)
                             or has_flag(self.passthrough, "pretrained_model_name_or_path"))
        self.has_data = any(getattr(args, o) for o in DATA_OPTIONS) or any(
            has_flag(self.passthrough, o) for o in DATA_OPTIONS)

    @property
    def log_file(self) -> str:
        return os.path.join(self.log_dir, f"train_{self.device_id}.log")

    def main_job(self) -> bool:
        """The embedded default of a task whose profile asks for the learning check (the README's main job)."""
        return self.profile.learning_check and self.embedded and not self.has_data and self.variant is None

    def program(self) -> List[str]:
        if self.args.script:
            path = os.path.abspath(self.args.script)
            if not os.path.isfile(path):
                raise UsageError(f"--script {self.args.script}: no such file")
            return [path]
        example = getattr(self.task_cls, "example", None)
        if example and os.path.isfile(os.path.join(REPO_ROOT, example)):
            return [os.path.join(REPO_ROOT, example)]
        # An installed package without the repository's examples/: the trainer's own entry point.
        return ["-m", "diffusers_npu.train", self.task_cls.name]

    def flags(self, world: int) -> Dict[str, object]:
        a = self.args
        base = self.variant.flags if self.variant else (
            self.profile.embedded if self.embedded else self.profile.pretrained)
        flags: Dict[str, object] = dict(base)
        if isinstance(flags.get("config"), str) and not os.path.isabs(flags["config"]):
            flags["config"] = os.path.join(REPO_ROOT, flags["config"])  # profiles name repo-relative files
        for option, flag in MODELZOO_FLAGS.items():
            value = getattr(a, option)
            if value is not None:
                flags[flag] = os.path.abspath(value) if option == "output_dir" else value
        if self.nnodes > 1 and "output_dir" not in flags and not has_flag(self.passthrough, "output_dir"):
            # The default is under --log_dir, on this node's disk; every node must write into ONE folder.
            raise UsageError(f"--output_dir is required with several nodes (nodes={self.nnodes}): give a folder "
                             f"on a filesystem every node mounts at the same path (NFS, Lustre, ...); the default "
                             f"{os.path.join(self.log_dir, self.network)} is on this node's own disk")
        flags.setdefault("output_dir", os.path.join(self.log_dir, self.network))
        want_check = a.learning_check if a.learning_check is not None else self.main_job()
        if want_check:
            flags["learning_check"] = True
        elif a.learning_check is False or (read_config(flags.get("config")).get("learning_check")
                                           and not has_flag(self.passthrough, "config")):
            # --no-learning_check: the profile's config file switches the check on for the digits, and the
            # digits classifier says nothing about another data set.
            flags["learning_check"] = False
        flags["resume_from_checkpoint"] = "latest"  # a rerun continues; the first run finds none and starts
        flags["disable_progress_bar"] = True        # the launcher draws the progress itself
        if world > 1:
            flags.setdefault("distributed", self.profile.distributed)
        mode = flag_value(self.passthrough, "distributed") or flags.get("distributed")
        if mode == "deepspeed" and not has_flag(self.passthrough, "zero_stage"):
            flags.setdefault("zero_stage", 2)  # said explicitly, so the printed DeepSpeed config is the one used
        return flags

    def build(self, device: str, nproc: int) -> Plan:
        topo = Topology(device=device, nproc=nproc, nnodes=self.nnodes, node_rank=self.node_rank,
                        master_addr=self.master_addr,
                        master_port=self.master_port if (self.nnodes > 1 or self.master_port) else None)
        train_args = to_tokens(self.flags(topo.world)) + self.passthrough
        # accelerate launch --cpu --num_processes N runs ONE process; torchrun with this variable runs N (gloo).
        env = {"ACCELERATE_USE_CPU": "true"} if device == "cpu" and topo.world > 1 else {}
        if topo.world > 1:  # read by torchruns that have --shutdown-timeout (2.14.1 does); older ones keep 30 s
            env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(self.args.shutdown_timeout or SHUTDOWN_TIMEOUT_S)
        return Plan(task=self.task_cls.name, network=self.network, case_suffix=self.case_suffix, topology=topo,
                    program=self.program(), train_args=train_args, env=env)


def _env_int(env, name: str, default: int) -> int:
    text = env.get(name)
    if text in (None, ""):
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"${name} must be a whole number, got {text!r}") from None


__all__ = ["NEGATABLE", "REPO_ROOT", "SHUTDOWN_TIMEOUT_S", "Plan", "PlanBuilder", "Topology", "flag_value", "has_flag", "read_config",
           "to_tokens"]
