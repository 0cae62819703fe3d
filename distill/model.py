"""The Jasper student: a text encoder, a SigLIP vision tower and four linear heads.

Text path::

    tokens -> text encoder -> mean pool over the attention mask -> FC1..FC4 (raw vectors)

Image path (stage 4)::

    pixels -> SigLIP -> AdaptiveAvgPool2d((num_img_tokens, text_hidden))
           -> written over the embeddings of the num_img_tokens placeholder tokens that sit
              between the image start/end tokens -> the same encoder, pooling and heads

Heads are ``Linear(hidden, d, bias=True)`` with no activation (paper: 12288/1024/512/256). Outputs are
raw; the losses and the exporter normalise. Build a student with :func:`build_student`, reload a
saved one with ``JasperStudent.from_pretrained(path)`` (the encoder's and the vision tower's configs
live inside the student's config, so the original folders are not needed).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.configuration_utils import SubConfigSpec

from distill.errors import DistillError
from embed_cache.models.hub import model_metadata, model_prompts, native_folder
from embed_cache.models.native import (
    apply_saved_attention,
    load_tokenizer,
    mean_pool,
    native_architecture,
    set_attention,
)
from embed_cache.models.stella import STELLA_ATTENTION, STELLA_EOS, load_stella_backbone

PAPER_HEAD_DIMS = (12288, 1024, 512, 256)
DEMO_HEAD_DIMS = (1152, 512, 256, 128)
PAPER_NUM_IMG_TOKENS = 300

IMAGE_START_TOKEN = "<|jasper_img_start|>"
IMAGE_TOKEN = "<|jasper_img_token|>"
IMAGE_END_TOKEN = "<|jasper_img_end|>"

HeadOutputs = dict[str, torch.Tensor]


def head_names(num_heads: int) -> tuple[str, ...]:
    """Names of the heads in order: ``fc1`` (the largest, the target's size) to ``fc<num_heads>``."""
    return tuple(f"fc{index}" for index in range(1, num_heads + 1))


class JasperConfig(PreTrainedConfig):
    """Configuration of :class:`JasperStudent`.

    Args:
        text_config: the text encoder's config (any ``AutoModel`` that accepts ``inputs_embeds``).
        vision_config: a ``SiglipVisionConfig``.
        head_dims: output size of FC1, FC2, ... (paper: 12288, 1024, 512, 256).
        num_img_tokens: how many placeholder tokens an image occupies (paper: 300).
        image_start_token_id, image_token_id, image_end_token_id: set by :func:`prepare_tokenizer`.
        encoder_prompts: the prompts, by name, that the text encoder came with (its
            config_sentence_transformers.json, read by :func:`build_student`: Stella's ``s2p_query``
            and ``s2s_query``; none for all-MiniLM-L6-v2).
        trained_prompts: the prompts, by name, that distillation prepended to the texts the student
            trained on: none, as the corpus texts carry none (teachers' prompts stay in the store).

    A student answers to exactly ``encoder_prompts`` and ``trained_prompts`` (:attr:`JasperStudent.prompts`):
    exports and the MTEB adapter offer those and no others, since a prompt the student never met
    moves its vectors off everything it learned.
    """

    model_type = "jasper_student"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "vision_config": SubConfigSpec(config_class=SiglipVisionConfig),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    head_dims: Sequence[int] = PAPER_HEAD_DIMS
    num_img_tokens: int = PAPER_NUM_IMG_TOKENS
    image_start_token_id: int | None = None
    image_token_id: int | None = None
    image_end_token_id: int | None = None
    encoder_prompts: dict[str, str] | None = None
    trained_prompts: dict[str, str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # a student saved before prompts were recorded was built and trained without any it could use
        self.encoder_prompts = dict(self.encoder_prompts or {})
        self.trained_prompts = dict(self.trained_prompts or {})
        self.head_dims = [int(dim) for dim in self.head_dims]  # JSON gives lists; keep one type
        if not self.head_dims:
            raise ValueError("head_dims is empty: give at least one head size, e.g. (12288, 1024, 512, 256).")
        if self.num_img_tokens < 1:
            raise ValueError(f"num_img_tokens must be at least 1, got {self.num_img_tokens}.")


class JasperStudent(PreTrainedModel):
    """Text encoder + mean pooling + FC heads, with a SigLIP tower for images (see module docs)."""

    config_class = JasperConfig
    base_model_prefix = "jasper"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # Attention runs inside the encoder and the vision tower, which check their own support.
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(
        self,
        config: JasperConfig,
        text_encoder: PreTrainedModel | None = None,
        vision_tower: SiglipVisionModel | None = None,
    ):
        """Build from ``config``; :func:`build_student` passes pretrained ``text_encoder`` / ``vision_tower``."""
        super().__init__(config)
        self.text_encoder = text_encoder if text_encoder is not None else AutoModel.from_config(config.text_config)
        # Mean pooling never uses the encoder's own pooler (BERT-style models have one); an unused
        # trainable parameter would make DDP / ZeRO fail in stage 3, so drop it.
        if isinstance(getattr(self.text_encoder, "pooler", None), nn.Module):
            self.text_encoder.pooler = None
        apply_saved_attention(self.text_encoder)  # a rebuilt bidirectional decoder must stay bidirectional
        self.vision_tower = vision_tower if vision_tower is not None else SiglipVisionModel(config.vision_config)
        text_hidden = config.text_config.hidden_size
        self.image_pooler = nn.AdaptiveAvgPool2d((config.num_img_tokens, text_hidden))
        names = head_names(len(config.head_dims))
        self.heads = nn.ModuleDict(
            {name: nn.Linear(text_hidden, dim, bias=True) for name, dim in zip(names, config.head_dims)}
        )
        # from_config copies the sub-configs; share them so that resizing the embeddings (which
        # updates the encoder's vocab_size) is what gets saved.
        config.text_config = self.text_encoder.config
        config.vision_config = self.vision_tower.config
        self.post_init()

    @property
    def prompts(self) -> dict[str, str]:
        """The prompts this student answers to, by name: its encoder's own, then those it trained
        with (a trained prompt wins a shared name); {} when it knows none, so texts go in bare."""
        return {**self.config.encoder_prompts, **self.config.trained_prompts}

    @torch.no_grad()
    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], head: str | None = None,
               prompt: str = "", batch_size: int = 64, max_length: int = 512,
               states: torch.Tensor | None = None) -> dict[str, np.ndarray] | np.ndarray:
        """Raw float32 vectors of `texts`, in order, each read with `prompt` before it: ``{head: (n, d)}``
        for every head, or the ``(n, d)`` array of `head`. The one way the project encodes texts with a
        student (evaluation, the caption targets, the MTEB adapter). `states`: the texts' pooled states
        from :meth:`encode_pooled`, when computed already; then only the heads run."""
        if head is not None and head not in self.heads:
            raise ValueError(f"the student has no head {head!r}; it has {', '.join(self.heads)}.")
        if states is None:
            states = self.encode_pooled(tokenizer, [prompt + text for text in texts], batch_size, max_length)
        states = states.to(next(self.parameters()).device)
        vectors = {name: layer(states).float().cpu().numpy() for name, layer in self.heads.items()
                   if head in (None, name)}
        return vectors if head is None else vectors[head]

    @torch.no_grad()
    def encode_pooled(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 64,
                      max_length: int = 512) -> torch.Tensor:
        """Mean-pooled last hidden states ``[n, hidden]`` (float32, on the CPU) of `texts`, in order, the
        encoder in eval mode on the model's device: what every head reads (and the least-squares head
        fits). Texts are batched by length, so batches pad little."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = np.argsort([len(text) for text in texts], kind="stable")
        parts = []
        for first in range(0, len(texts), batch_size):
            batch = tokenizer([texts[i] for i in order[first:first + batch_size]], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            parts.append(self.pooled(batch["input_ids"], batch["attention_mask"]).float().cpu())
        self.train(was_training)
        states = torch.cat(parts) if parts else torch.empty(0, self.config.text_config.hidden_size)
        return states[torch.from_numpy(np.argsort(order, kind="stable"))]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> HeadOutputs:
        """One raw vector per head for each text: ``{"fc1": [B, d1], "fc2": [B, d2], ...}``."""
        return self(input_ids=input_ids, attention_mask=attention_mask)

    def encode_image(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> HeadOutputs:
        """One raw vector per head for each image; build ``input_ids`` with :func:`image_inputs`."""
        return self(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        length_groups: int = 1,
    ) -> HeadOutputs:
        """Encode texts, or images when ``pixel_values`` is given (one image per row of ``input_ids``);
        or apply the heads to ``pooled`` states computed earlier (stage 1 on a frozen encoder).
        ``length_groups > 1`` encodes a text batch in that many length-sorted groups
        (:meth:`pooled_in_groups`)."""
        if pooled is None and length_groups > 1 and pixel_values is None:
            pooled = self.pooled_in_groups(input_ids, attention_mask, length_groups)
        elif pooled is None:
            pooled = self.pooled(input_ids, attention_mask, pixel_values)
        return {name: head(pooled) for name, head in self.heads.items()}

    def pooled_in_groups(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: int) -> torch.Tensor:
        """:meth:`pooled` of a padded text batch, encoded in `groups` length-sorted parts, each cut to
        its own longest text; rows come back in the batch's order.

        A random batch of short texts pads to its longest one: on the demo corpus only 30% of the
        encoded tokens are real, 69% with 4 groups. Dropping a column that is padding in every row of
        a group changes no real token's attention or position (padding is masked out, and sits on the
        right), so the states equal one padded pass up to float rounding; the loss still sees the whole
        batch. A left-padded batch has no such column and is encoded whole per group.
        """
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        parts = []
        for rows in torch.tensor_split(order, groups):
            if len(rows) == 0:
                continue
            mask = attention_mask[rows]
            width = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else mask.shape[1]
            parts.append(self.pooled(input_ids[rows, :width], mask[:, :width]))
        return torch.cat(parts)[torch.argsort(order)]

    def pooled(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean-pooled last hidden state [B, hidden] that every head reads."""
        inputs_embeds = self.text_encoder.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            inputs_embeds = self._insert_image_tokens(inputs_embeds, input_ids, pixel_values)
        hidden = self.text_encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def _insert_image_tokens(
        self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        placeholders = self._image_placeholder_mask(input_ids)
        patches = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        # [B, patches, vision_hidden] -> [B, num_img_tokens, text_hidden]: the pooler reads the
        # batch as channels and pools the (patch, feature) plane.
        image_tokens = self.image_pooler(patches).to(inputs_embeds.dtype)
        # masked_scatter fills placeholders in row-major order, row b taking image b's tokens.
        return inputs_embeds.masked_scatter(placeholders.unsqueeze(-1), image_tokens)

    def _image_placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.image_token_id is None:
            raise ValueError(
                "This student has no image tokens yet: call prepare_tokenizer(model, tokenizer) "
                "(build_student does it) before encoding images."
            )
        placeholders = input_ids == self.config.image_token_id
        counts = placeholders.sum(dim=1)
        wrong = (counts != self.config.num_img_tokens).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(
                f"Rows {wrong} of input_ids hold {counts[wrong].tolist()} image placeholder tokens, "
                f"but each image needs exactly {self.config.num_img_tokens}: build the inputs with "
                "image_inputs(tokenizer, config, texts) and do not truncate them."
            )
        return placeholders

    def encoder_layers(self) -> nn.ModuleList:
        """The encoder's list of transformer blocks (Qwen2: ``layers``, BERT: ``encoder.layer``).

        Found as the only ``nn.ModuleList`` with ``num_hidden_layers`` entries, so any
        encoder architecture works without a table of names.
        """
        expected = self.config.text_config.num_hidden_layers
        candidates = {
            name: module
            for name, module in self.text_encoder.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == expected
        }
        if len(candidates) != 1:
            raise ValueError(
                f"Cannot find the layer list of {type(self.text_encoder).__name__}: expected exactly one "
                f"nn.ModuleList of num_hidden_layers={expected} blocks, found {sorted(candidates) or 'none'}. "
                "Use an encoder whose blocks sit in a single nn.ModuleList (Qwen2, BERT, MPNet, ...)."
            )
        return next(iter(candidates.values()))


def disable_dropout(module: nn.Module) -> None:
    """Every dropout in `module` set to zero, train mode kept (gradient checkpointing runs only in
    train mode): its `nn.Dropout` layers, which BERT's attention also reads its rate from, and the
    float `attention_dropout` that Qwen2, Llama and Mistral attention modules keep instead.

    The paper's student, Stella on Qwen2, has no dropout; BERT-style encoders (MiniLM) carry 0.1. The
    saved config keeps the encoder's own rates: this is how one stage trains, not what the model is.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
        if isinstance(getattr(layer, "attention_dropout", None), float):
            layer.attention_dropout = 0.0


def build_student(
    text_encoder: str | Path,
    vision: SiglipVisionConfig | str | Path,
    *,
    head_dims: Sequence[int] = PAPER_HEAD_DIMS,
    num_img_tokens: int = PAPER_NUM_IMG_TOKENS,
    tokenizer: PreTrainedTokenizerBase | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    vision_revision: str | None = None,
    attention: str | None = None,
    eos: str | None = None,
) -> tuple[JasperStudent, PreTrainedTokenizerBase]:
    """Assemble a student from a pretrained text encoder and a SigLIP vision tower.

    Args:
        text_encoder: folder (or hub id) of the text encoder, e.g. stella_en_1.5B_v5 or all-MiniLM-L6-v2.
        vision: a ``SiglipVisionConfig`` (fresh random tower) or a folder / hub id of a SigLIP
            checkpoint (full SigLIP or vision-only, e.g. siglip-so400m-patch14-384).
        head_dims: FC1..FCn output sizes (paper 12288/1024/512/256, demo 1152/512/256/128);
            heads start freshly initialised.
        num_img_tokens: placeholder tokens per image (paper 300).
        tokenizer: the encoder's tokenizer; loaded from ``text_encoder`` when omitted.
        trust_remote_code: run code shipped with the checkpoints; off unless you pass True. Never
            needed for Stella, whose encoder loads natively (see :func:`load_text_encoder`).
        revision, vision_revision: hub commits to pin the encoder and the tower to (ignored for folders).
        attention: "bidirectional" or "causal" for a decoder encoder; None keeps the encoder's own
            (Stella's: bidirectional, as its released code runs).
        eos: "token" appends the tokenizer's EOS to every text, "none" does not; None keeps the
            encoder's own (Stella's: appended, as its released tokenizer does).

    Returns:
        ``(model, tokenizer)`` with the image tokens added (see :func:`prepare_tokenizer`); the
        encoder's own prompts (its config_sentence_transformers.json) recorded in
        ``model.config.encoder_prompts``.

    Example::

        model, tokenizer = build_student("all-MiniLM-L6-v2", SiglipVisionConfig(), head_dims=DEMO_HEAD_DIMS)
        batch = tokenizer(["a text"], return_tensors="pt")
        vectors = model.encode_text(batch["input_ids"], batch["attention_mask"])  # {"fc1": [1, 1152], ...}
    """
    encoder, tokenizer = load_text_encoder(text_encoder, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                                           revision=revision, attention=attention, eos=eos)
    # Only the pooled patch tokens are used, never SigLIP's attention-pooling head; an unused
    # trainable head would break DDP in stage 4, so it is not built.
    if isinstance(vision, SiglipVisionConfig):
        vision_config = copy.deepcopy(vision)
        vision_config.vision_use_head = False
        vision_tower = SiglipVisionModel(vision_config)
    else:
        vision_tower = SiglipVisionModel.from_pretrained(vision, revision=vision_revision, vision_use_head=False)
    # Copies: a new config resets its sub-configs' attention implementation, and the built
    # modules must keep theirs (JasperStudent then shares the modules' own configs).
    config = JasperConfig(
        text_config=encoder.config.to_dict(),
        vision_config=vision_tower.config.to_dict(),
        head_dims=list(head_dims),
        num_img_tokens=num_img_tokens,
        encoder_prompts=model_prompts(str(text_encoder), revision),
    )
    model = JasperStudent(config, text_encoder=encoder, vision_tower=vision_tower)
    prepare_tokenizer(model, tokenizer)
    model.eval()  # like from_pretrained: the pretrained parts arrive in eval mode, the heads must match
    return model, tokenizer


def load_text_encoder(
    text_encoder: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attention: str | None = None,
    eos: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The student's text encoder and tokenizer, dispatched on the folder's config.json.

    Stella's layout loads natively (``embed_cache.models.stella``: strict keys, its attention mode and EOS
    handling), so the student starts from exactly the Stella teacher's pooled state; its repository
    code never runs. Any other model goes through ``AutoModel``; one that ships code (``auto_map``)
    needs ``trust_remote_code``, because without it transformers would silently build its stock class.
    """
    config, modules = model_metadata(str(text_encoder), revision)
    if native_architecture(config, modules) == "stella":
        folder = Path(native_folder(str(text_encoder), revision))
        encoder = load_stella_backbone(folder, attention or STELLA_ATTENTION)
        if tokenizer is None:
            tokenizer = load_tokenizer(folder, add_eos_token=(eos or STELLA_EOS) == "token")
        return encoder, tokenizer
    if "auto_map" in config and not trust_remote_code:
        raise DistillError(
            f"the student's text encoder {text_encoder} ships its own code (auto_map in config.json), and without "
            "it transformers would build its stock class instead: review the code at a pinned `revision`, then "
            "set `student.trust_remote_code: true`."
        )
    encoder = AutoModel.from_pretrained(text_encoder, revision=revision, trust_remote_code=trust_remote_code)
    if hasattr(encoder.config, "use_cache"):
        encoder.config.use_cache = False  # an encoder never decodes: a KV cache is wasted memory
    if attention is not None:
        set_attention(encoder, attention)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(text_encoder, revision=revision, trust_remote_code=trust_remote_code)
    if eos is not None:
        tokenizer.add_eos_token = eos == "token"
    return encoder, tokenizer


def prepare_tokenizer(model: JasperStudent, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make ``tokenizer`` and ``model`` ready for images; safe to call again.

    Adds the image start / placeholder / end tokens as special tokens, grows the encoder's
    embedding matrix when the vocabulary outgrows it, records the three ids in ``model.config``
    and pads on the right (so that the positions of real tokens never depend on how much padding
    a batch needs).
    """
    image_tokens = [IMAGE_START_TOKEN, IMAGE_TOKEN, IMAGE_END_TOKEN]
    tokenizer.add_tokens(image_tokens, special_tokens=True)
    tokenizer.padding_side = "right"
    embedding_rows = model.text_encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedding_rows:
        model.text_encoder.resize_token_embeddings(len(tokenizer))
    start_id, image_id, end_id = tokenizer.convert_tokens_to_ids(image_tokens)
    model.config.image_start_token_id = start_id
    model.config.image_token_id = image_id
    model.config.image_end_token_id = end_id


def image_inputs(
    tokenizer: PreTrainedTokenizerBase, config: JasperConfig, texts: Sequence[str], max_length: int = 512
) -> BatchEncoding:
    """Tokenize one image input per entry of ``texts``.

    Each sequence is ``<image start> <image token> x num_img_tokens <image end> text`` (plus the
    tokenizer's own special tokens), where ``text`` is a caption or prompt, or ``""`` for the image
    alone. Pass the result's ``input_ids`` / ``attention_mask`` to ``JasperStudent.encode_image``.
    """
    image_block = IMAGE_START_TOKEN + IMAGE_TOKEN * config.num_img_tokens + IMAGE_END_TOKEN
    return tokenizer(
        [image_block + text for text in texts],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )


AutoConfig.register(JasperConfig.model_type, JasperConfig, exist_ok=True)
AutoModel.register(JasperConfig, JasperStudent, exist_ok=True)
