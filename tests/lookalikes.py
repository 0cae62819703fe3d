"""Tiny look-alikes of the paper's models in their exact hub layouts, with random weights.

- NV-Embed-v2: config.json (model_type nvembed, the real auto_map, a bidir_mistral text_config),
  fp16 weights in two shards + model.safetensors.index.json under the real key names, a
  SentencePiece-style BPE tokenizer (byte fallback, <s> prepended) with tokenizer_config.json
  naming LlamaTokenizer, and sentence-transformers module files.
- stella_en_1.5B_v5: config.json (qwen2, the real auto_map, Qwen2ForCausalLM), fp32 weights in
  one model.safetensors with keys under ``model.``, a byte-level BPE tokenizer whose tokenizer.json
  has no EOS post-processor while tokenizer_config.json says add_eos_token (as the real one),
  modules.json -> 2_Dense_1024, plus 2_Dense_8192.
- SigLIP so400m-patch14-384: a full SiglipModel checkpoint (text + vision keys, logit scale/bias).

Each folder also holds the repository's code files as decoys that raise when imported: the native
loaders must never run them. ``python -m tests.lookalikes OUT`` writes all three.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import MistralConfig, MistralModel, Qwen2Config, Qwen2Model, SiglipConfig, SiglipModel

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.", "A photo of a cat sitting on a mat.",
    "Embedding models map text to vectors; similar texts get similar vectors.",
    "def encode(texts): return model(texts)", "Distillation trains a small student from large teachers.",
    "naïve café – 東京 – emoji 🙂 and numbers 12345", "Mistral and Qwen2 are decoder-only transformers.",
]
DECOY = 'raise RuntimeError("repository code was imported: the native loader must never run it")\n'

NVEMBED_AUTO_MAP = {"AutoConfig": "configuration_nvembed.NVEmbedConfig", "AutoModel": "modeling_nvembed.NVEmbedModel"}
STELLA_AUTO_MAP = {"AutoModel": "modeling_qwen.Qwen2Model", "AutoModelForCausalLM": "modeling_qwen.Qwen2ForCausalLM",
                   "AutoModelForSequenceClassification": "modeling_qwen.Qwen2ForSequenceClassification"}
NVEMBED_LATENT = {"model_type": "latent_attention", "num_latents_value": 16, "num_cross_heads": 8,
                  "hidden_dim": 32, "latent_dim": 32, "cross_dim_head": 8}
STELLA_DENSE_DIMS = {"2_Dense_1024": 24, "2_Dense_8192": 8192}
# Stella's two prompt names with wording of the look-alike's own: an export must take them from the folder
STELLA_LOOKALIKE_PROMPTS = {"s2p_query": "Instruct: find the passage for this look-alike query.\nQuery: ",
                            "s2s_query": "Instruct: find look-alike text like this.\nQuery: "}


def _save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """tokenizer.json with merges as "a b" strings, as the hub files (and tokenizers < 0.20) have them."""
    data = json.loads(tokenizer.to_str())
    data["model"]["merges"] = [" ".join(pair) if isinstance(pair, list) else pair for pair in data["model"]["merges"]]
    _write_json(path, data)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def _random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter drawn at random (not the usual init: LayerNorms and biases must matter too)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) * (0.02 if value.dim() > 1 else 0.5)
            + (1.0 if key.endswith("norm.weight") or "layernorm" in key else 0.0)
            for key, value in module.state_dict().items()}


def _sentencepiece_bpe() -> Tokenizer:
    """A Llama/Mistral-style tokenizer: '▁' for spaces, byte fallback, <unk> <s> </s> = 0 1 2."""
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                                         show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return tokenizer


def _byte_level_bpe() -> Tokenizer:
    """A Qwen2-style byte-level BPE with <|endoftext|> <|im_start|> <|im_end|>; no EOS post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                                   r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _sentence_transformers_files(folder: Path, hidden: int, dense: str | None, include_prompt: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    modules.append({"idx": 2, "name": "2", "path": dense, "type": "sentence_transformers.models.Dense"} if dense
                   else {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": include_prompt})
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": 512, "do_lower_case": False})


def save_nvembed_lookalike(folder: Path, seed: int = 0) -> Path:
    """NV-Embed-v2's layout with a 2-layer, 32-wide Mistral and a 16-latent attention block."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _sentencepiece_bpe()
    _save_tokenizer(tokenizer, folder / "tokenizer.json")
    text_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": 512,
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4, "hidden_act": "silu",
                   "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "use_cache": True,
                   "attention_dropout": 0.0}
    mistral = MistralModel(MistralConfig(**text_config))
    state = {f"embedding_model.{k}": v for k, v in _random_state(mistral, seed).items()}
    latent = NVEMBED_LATENT
    inner = latent["num_cross_heads"] * latent["cross_dim_head"]
    dim, generator = latent["latent_dim"], torch.Generator().manual_seed(seed + 1)

    def rand(*shape, scale=0.2, shift=0.0):
        return torch.randn(shape, generator=generator) * scale + shift

    prefix = "latent_attention_model."
    state.update({
        f"{prefix}cross_attend_blocks.0.norm.weight": rand(dim, shift=1.0),
        f"{prefix}cross_attend_blocks.0.norm.bias": rand(dim),
        f"{prefix}cross_attend_blocks.0.norm_context.weight": rand(latent["hidden_dim"], shift=1.0),
        f"{prefix}cross_attend_blocks.0.norm_context.bias": rand(latent["hidden_dim"]),
        f"{prefix}cross_attend_blocks.0.fn.to_q.weight": rand(inner, dim),
        f"{prefix}cross_attend_blocks.0.fn.to_kv.weight": rand(2 * inner, latent["hidden_dim"]),
        f"{prefix}cross_attend_blocks.0.fn.to_out.weight": rand(dim, inner),
        f"{prefix}cross_attend_blocks.1.norm.weight": rand(dim, shift=1.0),
        f"{prefix}cross_attend_blocks.1.norm.bias": rand(dim),
        f"{prefix}cross_attend_blocks.1.fn.net.0.weight": rand(dim * 8, dim),
        f"{prefix}cross_attend_blocks.1.fn.net.0.bias": rand(dim * 8),
        f"{prefix}cross_attend_blocks.1.fn.net.2.weight": rand(dim, dim * 4),
        f"{prefix}cross_attend_blocks.1.fn.net.2.bias": rand(dim),
        f"{prefix}latents": rand(latent["num_latents_value"], dim, scale=1.0),
    })
    _save_sharded({k: v.half() for k, v in state.items()}, folder, shards=2)
    _write_json(folder / "config.json", {
        "_name_or_path": "nvidia/NV-Embed-v2", "add_eos": True, "add_pad_token": True,
        "architectures": ["NVEmbedModel"], "auto_map": NVEMBED_AUTO_MAP, "hidden_size": 32,
        "is_mask_instruction": True, "latent_attention_config": latent, "mask_type": "b", "model_type": "nvembed",
        "padding_side": "right", "text_config": {"_name_or_path": "nvidia/NV-Embed-v2", "architectures": ["MistralModel"],
                                                 "model_type": "bidir_mistral", **text_config},
        "torch_dtype": "float16", "transformers_version": "4.42.4"})
    special = {"0": "<unk>", "1": "<s>", "2": "</s>"}
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": None,
        "added_tokens_decoder": {i: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True} for i, t in special.items()},
        "additional_special_tokens": [], "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": True, "model_max_length": 1000000000000000019884624838656, "pad_token": "</s>",
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>", "use_default_system_prompt": False})
    _write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
                                                     "unk_token": "<unk>"})
    _sentence_transformers_files(folder, 32, dense=None, include_prompt=False)
    for name in ("modeling_nvembed.py", "configuration_nvembed.py"):
        (folder / name).write_text(DECOY, encoding="utf-8")
    return folder


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    keys = sorted(state)
    weight_map, total = {}, 0
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state[key].contiguous() for key in keys[index::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_stella_lookalike(folder: Path, seed: int = 0) -> Path:
    """stella_en_1.5B_v5's layout with a 2-layer, 32-wide Qwen2 and Dense heads 32->24 and 32->8192."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_bpe()
    _save_tokenizer(tokenizer, folder / "tokenizer.json")
    vocab = tokenizer.get_vocab()
    eos_id = vocab["<|endoftext|>"]
    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": 512,
              "max_window_layers": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 512,
              "use_sliding_window": False, "hidden_act": "silu", "bos_token_id": eos_id, "eos_token_id": eos_id,
              "tie_word_embeddings": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True}
    qwen = Qwen2Model(Qwen2Config(**config))
    save_file({f"model.{k}": v.contiguous() for k, v in _random_state(qwen, seed).items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", {"architectures": ["Qwen2ForCausalLM"], "auto_map": STELLA_AUTO_MAP,
                                         "model_type": "qwen2", "torch_dtype": "float32",
                                         "transformers_version": "4.42.3", **config})
    _write_json(folder / "tokenizer_config.json", {
        "add_eos_token": True, "add_prefix_space": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.Qwen2Tokenizer", "tokenization_qwen.Qwen2TokenizerFast"]},
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    _sentence_transformers_files(folder, 32, dense="2_Dense_1024", include_prompt=True)
    _write_json(folder / "config_sentence_transformers.json", {"prompts": STELLA_LOOKALIKE_PROMPTS,
                                                                "default_prompt_name": None})
    generator = torch.Generator().manual_seed(seed + 1)
    for name, out in STELLA_DENSE_DIMS.items():
        _write_json(folder / name / "config.json", {"in_features": 32, "out_features": out, "bias": True,
                                                    "activation_function": "torch.nn.modules.linear.Identity"})
        save_file({"linear.weight": torch.randn(out, 32, generator=generator) * 0.2,
                   "linear.bias": torch.randn(out, generator=generator) * 0.1}, str(folder / name / "model.safetensors"))
    for name in ("modeling_qwen.py", "tokenization_qwen.py"):
        (folder / name).write_text(DECOY, encoding="utf-8")
    return folder


def save_siglip_lookalike(folder: Path, seed: int = 0) -> Path:
    """google/siglip-so400m-patch14-384's layout: a full SiglipModel (text + vision + logit scale/bias),
    here 2 layers of width 48 on the real 384-pixel images with 14-pixel patches (729 patch tokens)."""
    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config={"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 400, "max_position_embeddings": 64},
        vision_config={"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 384, "patch_size": 14},
    )
    SiglipModel(config).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    out = Path(sys.argv[1])
    save_nvembed_lookalike(out / "nv-embed-v2")
    save_stella_lookalike(out / "stella_en_1.5B_v5")
    save_siglip_lookalike(out / "siglip-so400m-patch14-384")
    print(f"look-alikes written under {out}")
