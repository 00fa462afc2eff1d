"""A tiny randomly initialised Sortformer (~22k parameters) for tests and benches.

Same architecture and streaming code path as ``diar_streaming_sortformer_4spk-v2``
(FastConformer pre-encoder with 8x subsampling, Transformer, 4 speaker sigmoids), only
narrow and shallow. Its outputs are meaningless: use it for shapes, timing and cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_config(features: int = 16, fc_d_model: int = 32, tf_d_model: int = 16) -> dict[str, Any]:
    """A SortformerEncLabelModel config in NeMo's layout (see NeMo's streaming_sortformer_diarizer_4spk-v2.yaml)."""
    return {
        "sample_rate": 16000,
        "pil_weight": 0.5,
        "ats_weight": 0.5,
        "max_num_of_spks": 4,
        "streaming_mode": True,
        "async_streaming": True,
        "model_defaults": {"fc_d_model": fc_d_model, "tf_d_model": tf_d_model},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "normalize": "NA",
            "window_size": 0.025,
            "sample_rate": 16000,
            "window_stride": 0.01,
            "window": "hann",
            "features": features,
            "n_fft": 512,
            "frame_splicing": 1,
            "dither": 0.0,
        },
        "sortformer_modules": {
            "_target_": "nemo.collections.asr.modules.sortformer_modules.SortformerModules",
            "num_spks": 4,
            "dropout_rate": 0.5,
            "fc_d_model": fc_d_model,
            "tf_d_model": tf_d_model,
            "spkcache_len": 188,
            "fifo_len": 188,
            "chunk_len": 6,
            "spkcache_update_period": 144,
            "chunk_left_context": 1,
            "chunk_right_context": 7,
            "spkcache_sil_frames_per_spk": 3,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": features,
            "feat_out": -1,
            "n_layers": 1,
            "d_model": fc_d_model,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": 8,
            "ff_expansion_factor": 2,
            "self_attention_model": "rel_pos",
            "n_heads": 2,
            "att_context_size": [-1, -1],
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "batch_norm",
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },
        "transformer_encoder": {
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": 1,
            "hidden_size": tf_d_model,
            "inner_size": 2 * tf_d_model,
            "num_attention_heads": 2,
            "attn_score_dropout": 0.0,
            "attn_layer_dropout": 0.0,
            "ffn_dropout": 0.0,
            "hidden_act": "relu",
            "pre_ln": False,
            "pre_ln_final_layer_norm": True,
        },
        "loss": {"_target_": "nemo.collections.asr.losses.bce_loss.BCELoss", "weight": None, "reduction": "mean"},
    }


def save_tiny_sortformer(path: Path, seed: int = 0) -> Path:
    """Build the tiny model with random weights (seeded) and save it as a ``.nemo`` file."""
    import torch
    from nemo.collections.asr.models import SortformerEncLabelModel
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model = SortformerEncLabelModel(cfg=OmegaConf.create(tiny_config()))
    model.save_to(str(path))
    return path
