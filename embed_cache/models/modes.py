"""How the natively implemented encoders attend and end a text: plain data, no model library, so a
teacher spec can check them without importing torch."""

ATTENTION_MODES = ("bidirectional", "causal")
EOS_MODES = ("none", "text", "token")  # see embed_cache.teachers.spec.TeacherSpec.eos
# What the released stella_en_1.5B_v5 does (the evidence is in embed_cache/models/stella.py and docs/teachers.md).
STELLA_ATTENTION = "bidirectional"
STELLA_EOS = "token"
