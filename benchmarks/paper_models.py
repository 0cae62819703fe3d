"""The paper's models at full size, with random weights built from configs written here (no download).

For NV-Embed-v2, stella_en_1.5B_v5 (+ its 8192-d head) and the paper student (Stella + SigLIP
so400m vision tower + heads 12288/1024/512/256):

- parameters, counted on the meta device (checked against the hub checkpoints' sizes: NV-Embed-v2's
  index gives 15,702,032,384 bytes of fp16, Stella's model.safetensors 6,173,113,776 bytes of fp32);
- weight memory in bf16;
- the peak memory of one teacher encode batch at max length 512 (the build's default budget of
  16,384 tokens, and the paper preset's 65,536), and of one stage-3 step at the paper's batch
  (128 x 512 per GPU) under ZeRO-2 on 8 GPUs, with and without activation checkpointing:
  arithmetic (what must be resident), stated term by term below;
- measured on this machine where it fits: one encode batch of 512 tokens through the full-width
  model (Stella whole; NV-Embed-v2 with 2 of its 32 decoder layers, as 32 do not fit in 24 GiB of
  fp32), time and peak memory against the arithmetic for that same batch;
- on a GPU (when there is one): encode tokens/s and MFU per teacher, and phase 1's projected
  GPU-hours over 8M texts of 512 tokens.

    python -m benchmarks.paper_models [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn
from transformers import MistralConfig, MistralModel, Qwen2Config, Qwen2Model, SiglipVisionConfig, SiglipVisionModel

from benchmarks.resim import peak_resident_bytes
from benchmarks.table import Row, markdown
from embed_cache.models.native import set_attention
from embed_cache.models.nvembed import FF_MULT, LATENT_DEFAULTS, LatentAttentionPooling

# From the hub repositories' config.json at the pinned revisions (docs/teachers.md).
NVEMBED_TEXT = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                    rope_theta=10000.0)
STELLA_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, vocab_size=151646, max_position_embeddings=131072, rms_norm_eps=1e-6,
                   rope_theta=1000000.0)
SIGLIP_SO400M_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            image_size=384, patch_size=14, vision_use_head=False)
STELLA_HEAD, PAPER_HEADS, IMAGE_TOKENS_ADDED = 8192, (12288, 1024, 512, 256), 3
# Bytes of the hub checkpoints at the pinned revisions: NV-Embed-v2's index total_size (fp16 tensors,
# no headers) and the LFS size of Stella's root model.safetensors (fp32, header included).
HUB_BYTES = {"nv-embed": (15_702_032_384, 2), "stella": (6_173_113_776, 4)}
GPU_BF16_PEAK = 989e12  # H100 / H200 SXM, dense bf16 FLOP/s
ASSUMED_MFU = 0.4  # for the projection without a GPU; a GPU run measures it instead

GPUS, STAGE3_BATCH, MAX_LENGTH, CORPUS = 8, 128, 512, 8_000_000
BF16, FP32 = 2, 4
GIB = 2**30


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(kind: str, layers: int | None = None) -> dict[str, nn.Module]:
    """The model's parts; on the meta device unless built inside another device context."""
    if kind == "nv-embed":
        text = MistralModel(MistralConfig(**{**NVEMBED_TEXT, "num_hidden_layers": layers or 32}))
        set_attention(text, "bidirectional")
        return {"decoder": text, "latent": LatentAttentionPooling(**LATENT_DEFAULTS)}
    # the student's vocabulary has the three image tokens added to Stella's
    vocab = STELLA_TEXT["vocab_size"] + (IMAGE_TOKENS_ADDED if kind == "student" else 0)
    text = Qwen2Model(Qwen2Config(**{**STELLA_TEXT, "num_hidden_layers": layers or 28, "vocab_size": vocab}))
    set_attention(text, "bidirectional")
    if kind == "stella":
        return {"decoder": text, "head": nn.Linear(1536, STELLA_HEAD)}
    return {"decoder": text, "heads": nn.ModuleList(nn.Linear(1536, d) for d in PAPER_HEADS),
            "vision": SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M_VISION))}


def parameters() -> dict[str, dict[str, int]]:
    with torch.device("meta"):
        return {kind: {part: count(module) for part, module in build(kind).items()}
                for kind in ("nv-embed", "stella", "student")}


# ------------------------------------------------------------------ arithmetic
def decoder_inference_bytes(config: dict, tokens: int, width: int) -> int:
    """Live activations while one decoder layer runs (inference, SDPA: no L x L matrix kept): the
    residual stream, its norm, q / k / v, the attention output, and the MLP's gate, up and product."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    return tokens * width * (4 * h + 2 * kv + 3 * inter)


def latent_inference_bytes(tokens: int, width: int) -> int:
    """NV-Embed-v2's latent block: queries and attention output are heads x dim_head = 32768 wide per
    token, the GEGLU feed-forward 8 x 4096 up and 4 x 4096 after the gate, plus the residual."""
    inner = LATENT_DEFAULTS["num_cross_heads"] * LATENT_DEFAULTS["cross_dim_head"]
    latent = LATENT_DEFAULTS["latent_dim"]
    return tokens * width * (2 * inner + 2 * FF_MULT * latent + FF_MULT * latent + 2 * latent)


def encode_peak_bytes(kind: str, params: dict[str, int], tokens: int, width: int = BF16) -> int:
    weights = sum(params.values()) * width
    config = NVEMBED_TEXT if kind == "nv-embed" else STELLA_TEXT
    activations = decoder_inference_bytes(config, tokens, width)
    if kind == "nv-embed":
        activations = max(activations, latent_inference_bytes(tokens, width))
    return weights + activations


def stage3_bytes(params: dict[str, int], checkpointing: bool, gpus: int = GPUS) -> dict[str, float]:
    """Per-GPU bytes of one stage-3 step (text side trainable, vision frozen) under ZeRO-2, bf16.

    Weights bf16 on every GPU; gradients (bf16) and the optimizer's fp32 master copy + Adam m and v
    partitioned over `gpus`. Activations kept for backward per token per layer, bf16: the layer
    input, the norms' outputs (2), q, k, v, the attention output, the residual after attention, and
    the MLP's gate, up, activation and product (4 x intermediate) = 2 x (7h + 2kv + 4I) bytes; with
    checkpointing only each layer's input (2h bytes) is kept and one layer is recomputed at a time.
    """
    trainable = params["decoder"] + params["heads"]
    h, inter, layers = STELLA_TEXT["hidden_size"], STELLA_TEXT["intermediate_size"], STELLA_TEXT["num_hidden_layers"]
    kv = h // STELLA_TEXT["num_attention_heads"] * STELLA_TEXT["num_key_value_heads"]
    tokens = STAGE3_BATCH * MAX_LENGTH
    per_layer = tokens * BF16 * (7 * h + 2 * kv + 4 * inter)
    activations = tokens * BF16 * h * layers + per_layer if checkpointing else per_layer * layers
    return {
        "weights": (trainable + params["vision"]) * BF16,
        "gradients": trainable * BF16 / gpus,
        "optimizer": trainable * (FP32 * 3) / gpus,
        "activations": activations,
        "head outputs and losses": STAGE3_BATCH * sum(PAPER_HEADS) * FP32 * 4,
    }


def flops_per_token(kind: str, params: dict[str, int]) -> float:
    """2 x parameters touched per token (embeddings are a lookup) + attention's 4 x L x h per layer."""
    config = NVEMBED_TEXT if kind == "nv-embed" else STELLA_TEXT
    embedding = config["vocab_size"] * config["hidden_size"]
    latent_kv = 0 if kind != "nv-embed" else 2 * LATENT_DEFAULTS["num_cross_heads"] * LATENT_DEFAULTS["cross_dim_head"] \
        * LATENT_DEFAULTS["hidden_dim"] + LATENT_DEFAULTS["num_latents_value"] * LATENT_DEFAULTS["latent_dim"]
    attention = 4 * MAX_LENGTH * config["hidden_size"] * config["num_hidden_layers"]
    return 2 * (sum(params.values()) - embedding - latent_kv) + attention


# ------------------------------------------------------------------ measured
def measure_encode(kind: str, layers: int | None, tokens: int, device: str, dtype: torch.dtype) -> dict:
    """One encode batch of `tokens` (batches of 512) through the model built with random weights."""
    torch.manual_seed(0)
    with torch.device(device):
        parts = build(kind, layers)
    for module in parts.values():
        module.to(dtype).eval()
    before = peak_resident_bytes() if device == "cpu" else 0
    weights = sum(count(m) for m in parts.values()) * torch.finfo(dtype).bits // 8
    batch = max(1, tokens // MAX_LENGTH)
    vocab = (NVEMBED_TEXT if kind == "nv-embed" else STELLA_TEXT)["vocab_size"]
    ids = torch.randint(0, vocab, (batch, MAX_LENGTH), device=device)
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            hidden = parts["decoder"](input_ids=ids, attention_mask=mask).last_hidden_state
            if kind == "nv-embed":
                return parts["latent"](hidden, mask)
            return parts["head"](hidden.mean(1))

    run()  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_resident_bytes()
    return {"seconds": seconds, "tokens": batch * MAX_LENGTH, "weights": weights,
            "activation_peak": peak - (weights if device == "cuda" else before)}


def measure_in_subprocess(kind: str, layers: int | None, tokens: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.paper_models", "--measure", kind, str(layers or 0), str(tokens)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure(quick: bool = False) -> list[Row]:
    params = parameters()
    rows = []
    for kind in ("nv-embed", "stella"):
        total = sum(params[kind].values())
        hub_bytes, width = HUB_BYTES[kind]
        checked = total if kind == "nv-embed" else params[kind]["decoder"]  # Stella's root file: no head
        rows.append(Row(f"{kind} {'all' if kind == 'nv-embed' else 'encoder'} parameters x {width} B (meta device)",
                        checked * width / 1e6, "MB", "hub checkpoint's bytes", hub_bytes / 1e6, ("≥", 0.9999)))
        rows.append(Row(f"{kind} weights, bf16", total * BF16 / GIB, "GiB"))
        for budget in (16384, 65536):
            rows.append(Row(f"{kind} encode peak, {budget:,} tokens at max length 512, bf16 (arithmetic)",
                            encode_peak_bytes(kind, params[kind], budget) / GIB, "GiB"))
        rows.append(Row(f"{kind} phase 1 over 8M texts x 512 tokens at an ASSUMED {ASSUMED_MFU:.0%} MFU of "
                        f"989 TFLOPS (projection, not a measurement)",
                        CORPUS * MAX_LENGTH * flops_per_token(kind, params[kind]) / (GPU_BF16_PEAK * ASSUMED_MFU)
                        / 3600, "GPU-hours"))
    student = params["student"]
    rows.append(Row("paper student parameters (Stella + heads + SigLIP so400m vision)",
                    sum(student.values()) / 1e6, "M"))
    for checkpointing in (False, True):
        parts = stage3_bytes(student, checkpointing)
        label = "with" if checkpointing else "without"
        rows.append(Row(f"stage-3 step per GPU, batch 128 x 512, ZeRO-2 on {GPUS} GPUs, {label} activation "
                        f"checkpointing (arithmetic; activations {parts['activations'] / GIB:,.0f} GiB)",
                        sum(parts.values()) / GIB, "GiB", target=("≤", 141)))
    if not quick:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for kind, layers in (("stella", None), ("nv-embed", None if device == "cuda" else 2)):
            tokens = 16384 if device == "cuda" else 512
            got = measure_in_subprocess(kind, layers, tokens)
            width = BF16 if device == "cuda" else FP32
            config = NVEMBED_TEXT if kind == "nv-embed" else STELLA_TEXT
            predicted = decoder_inference_bytes(config, got["tokens"], width)
            if kind == "nv-embed":
                predicted = max(predicted, latent_inference_bytes(got["tokens"], width))
            shape = f"{layers} of 32 layers, " if layers else ""
            rows.append(Row(f"{kind} encode, {shape}{got['tokens']} tokens, {device}: activation peak "
                            f"(measured vs arithmetic)", got["activation_peak"] / GIB, "GiB", "arithmetic",
                            predicted / GIB))
            tokens_per_second = got["tokens"] / got["seconds"]
            rows.append(Row(f"{kind} encode throughput, {shape}{device}", tokens_per_second, "tokens/s"))
            if device == "cuda" and not layers:
                mfu = tokens_per_second * flops_per_token(kind, params[kind]) / GPU_BF16_PEAK
                rows.append(Row(f"{kind} encode MFU on {torch.cuda.get_device_name(0)} (989 TFLOPS bf16)",
                                mfu * 100, "%"))
                rows.append(Row(f"{kind} phase 1 over 8M texts x 512 tokens", CORPUS * MAX_LENGTH / tokens_per_second
                                / 3600, "GPU-hours"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="arithmetic only")
    parser.add_argument("--measure", nargs=3, metavar=("KIND", "LAYERS", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, layers, tokens = args.measure
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        print(json.dumps(measure_encode(kind, int(layers) or None, int(tokens), device, dtype)))
        return
    print(markdown(measure(args.quick)))


if __name__ == "__main__":
    main()
