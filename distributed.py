# Many processes: torchrun --nproc_per_node N METHOD.py takes the same steps as one process. Optional:
# common.py imports it when it is beside it; without it a run is one process and a torchrun launch says
# what is missing. It imports nothing of the project.
#
# torchrun starts N copies of the script with RANK, LOCAL_RANK and WORLD_SIZE set. Each takes batch / N
# images of every global batch (common.build_data); the losses gather what they need over the global batch
# (gather), BatchNorm is synchronised (sync_batch_norm) and gradients are averaged (common.optimizer_step).
# Rank 0 alone evaluates, logs and saves. In one process every function here changes nothing.
import atexit
import datetime
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

PROCESS_TIMEOUT = datetime.timedelta(minutes=30)  # longer than rank 0's evaluations, which the others wait for


def join_processes(device, batch_size, world_size):
    """Under torchrun: joins the process group (NCCL on GPUs, one per process; gloo on CPUs), leaves stdout
    to rank 0, and makes a collective that fails because another process died one line on rank 0 (torchrun
    stops the rest of the run). Returns this process's rank."""
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" is then this process's GPU
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=PROCESS_TIMEOUT)
    atexit.register(dist.destroy_process_group)
    rank = dist.get_rank()
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # one process speaks; errors still reach stderr

    def stopped(kind=None, error=None, trace=None):  # a collective failed, or torchrun stops us (SIGTERM)
        if not (kind is None or peer_lost(error)):
            return sys.__excepthook__(kind, error, trace)
        if rank == 0 and not stopped.said:
            print("error: the run stops here: another process died or stopped answering, or torchrun was stopped "
                  "(its report below says which)", file=sys.stderr, flush=True)
        stopped.said = True
        if kind is None:  # at once, even mid-exit: torchrun's report follows
            sys.stdout.flush()
            os._exit(1)
    stopped.said = False
    sys.excepthook = stopped
    signal.signal(signal.SIGTERM, lambda *_: stopped())
    print(f"{world_size} processes train ({dist.get_backend()}, {os.environ.get('LOCAL_WORLD_SIZE', '?')} per "
          f"machine), each on {batch_size // world_size} images of every global batch of {batch_size}")
    return rank


def peer_lost(error):
    """Whether an exception is a collective's that failed because another process died or stopped answering."""
    return isinstance(error, dist.DistError) or any(  # gloo's lost peer is a RuntimeError
        word in str(error) for word in ("gloo", "NCCL", "Connection closed by peer"))


def gather(x):
    """x (b, ...) of each of the N processes -> (N b, ...) in rank order, on every process; x in one process.
    The gradient flows back: the backward sums every process's gradient of the gathered tensor and gives
    each process that of its own x (torch.distributed.all_gather has none). So a loss L of the global batch,
    computed by every process, gives each process's x the gradient N dL/dx, and averaging the parameters'
    gradients over the N processes (optimizer_step) gives dL/dparameters: one process's step, without
    rescaling the loss. A mean over local samples works too: its N copies sum to N times the global mean."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    return AllGather.apply(x)


class AllGather(torch.autograd.Function):
    """gather's all-gather and its backward: the sum over processes of the gathered gradient, this process's part."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd's may be shared: sum a copy
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def average_gradients(optimizer):
    """Each gradient becomes its mean over the processes (one all-reduce of them all, as DDP's buckets)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads]) / dist.get_world_size()
    dist.all_reduce(flat)
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def signalled_anywhere(signum):
    """The largest signal number any process received (0: none); signum itself in one process. Under
    torchrun this is a collective after every step (one integer: a host sync)."""
    if not (dist.is_available() and dist.is_initialized()):
        return signum
    flag = torch.tensor([signum], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def mean_over_processes(values):
    """A dict of floats averaged over the processes (logged terms); itself in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dict(zip(values, (total / dist.get_world_size()).tolist()))


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch for processes on CPUs, where nn.SyncBatchNorm does not run: the
    per-channel sums are all-reduced with their gradient (the same maths as nn.SyncBatchNorm's)."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)  # every axis but the channels
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = gather(x.sum(dims)[None]).sum(0) / count                         # (C,)
        centred = x - mean.view(shape)
        var = gather(centred.pow(2).sum(dims)[None]).sum(0) / count              # (C,) biased, to normalise
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)  # unbiased, as nn.BatchNorm
        return centred * torch.rsqrt(var + self.eps).view(shape) * self.weight.view(shape) + self.bias.view(shape)


def sync_batch_norm(module):
    """Every BatchNorm in module, replaced in place by one with the statistics of the global batch:
    nn.SyncBatchNorm on a GPU, GlobalBatchNorm on the CPU. Same state dict names, so checkpoints load
    with any number of processes."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            cls = nn.SyncBatchNorm if child.weight.is_cuda else GlobalBatchNorm
            synced = cls(child.num_features, child.eps, child.momentum).to(child.weight.device, child.weight.dtype)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            sync_batch_norm(child)
    return module
