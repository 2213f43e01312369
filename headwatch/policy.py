"""`headwatch policy`: write a per-KV-head compression policy from verdicts or an analysis.

Usage:
    headwatch policy --from-analysis reports/analyze-x/heads.json --out policy/
    headwatch policy --from-metrics http://127.0.0.1:9464/metrics --model-name tiny --out policy/

With --from-metrics, S and R are the exporter's `headwatch_model_sink_tokens` and
`headwatch_model_recent_tokens` unless --sink-tokens / --recent-tokens say otherwise.
Writes `policy.json` (format `headwatch.kv-policy.v1`, docs/policy-format.md) and, under
`duo_attention/`, the head-pattern files DuoAttention and kvpress's DuoAttentionPress read:
`config.json` (`sink_size`, `recent_size`) and `full_attention_heads.tsv` (one row per layer,
one tab-separated score per KV head in [0, 1]; low = streaming head).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headwatch.policy_metrics import fetch_metrics, read_verdicts
from headwatch.report.data import read_summary_json
from headwatch.report.errors import HeadwatchToolError, PolicyError
from headwatch.report.summary import HeadSummary

logger = logging.getLogger(__name__)

FORMAT = "headwatch.kv-policy.v1"
DUO_DIR = "duo_attention"


@dataclass(frozen=True)
class KvPolicy:
    """Which KV heads keep only their sink + recent keys; `error` is the worst p95 of its query heads."""

    model_name: str
    sink_tokens: int
    recent_tokens: int
    streaming: np.ndarray  # bool (layers, kv_heads): True = keep only sink + recent
    error: np.ndarray  # float (layers, kv_heads), NaN where unknown
    source: str
    error_bound: float = 0.05
    mean_error: np.ndarray | None = None  # (layers, kv_heads): worst mean error of its query heads

    def __post_init__(self) -> None:
        if self.streaming.ndim != 2 or self.streaming.shape != self.error.shape:
            raise PolicyError(
                f"expected streaming and error arrays of one (layers, kv_heads) shape, "
                f"got {self.streaming.shape} and {self.error.shape}"
            )
        if self.sink_tokens < 0 or self.recent_tokens < 1:
            raise PolicyError(
                f"expected sink_tokens >= 0 and recent_tokens >= 1, "
                f"got {self.sink_tokens} and {self.recent_tokens}"
            )

    @property
    def streaming_share(self) -> float:
        """Return the share of KV heads that keep only sink + recent."""
        return float(self.streaming.mean())

    def duo_scores(self) -> np.ndarray:
        """Return DuoAttention scores (layers, kv_heads): streaming heads below 0.5, others above.

        kvpress turns the `round(n * head_compression_ratio)` lowest scores into streaming heads,
        so with `head_compression_ratio = streaming_share` it picks exactly this policy's heads,
        and with a smaller ratio the safest of them first (score grows with the measured error).
        """
        err = np.nan_to_num(self.error, nan=1.0)
        safe_score = 0.499 * np.clip(err / self.error_bound, 0.0, 1.0)
        full_score = 0.5 + 0.5 * np.clip(err, 0.0, 1.0)
        return np.where(self.streaming, safe_score, full_score)


def from_summary(summary: HeadSummary) -> KvPolicy:
    """Return the policy of an analysis: its safe KV heads stream, with its S and R and the
    bound its verdicts were taken at."""
    group = summary.group
    shape = (summary.num_layers, summary.num_kv_heads, group)
    p95 = summary.eviction_error_p95.reshape(shape)
    mean = summary.stats["eviction_error"].reshape(shape)
    with np.errstate(all="ignore"):
        worst = np.where(np.isnan(p95).all(axis=2), np.nan, np.nanmax(p95, axis=2))
        worst_mean = np.where(np.isnan(mean).all(axis=2), np.nan, np.nanmax(mean, axis=2))
    return KvPolicy(
        model_name=summary.model_name,
        sink_tokens=summary.sink_tokens,
        recent_tokens=summary.recent_tokens,
        streaming=summary.safe_kv_heads.copy(),
        error=worst,
        source=f"analysis ({summary.samples} sampled rows; verdicts: {summary.verdict_source})",
        error_bound=summary.error_bound,
        mean_error=worst_mean,
    )


def from_metrics_text(
    text: str,
    model_name: str | None,
    sink_tokens: int | None = None,
    recent_tokens: int | None = None,
    where: str = "/metrics",
    bound: float = 0.05,
) -> KvPolicy:
    """Return the policy in an exporter's /metrics exposition for one model.

    S and R come from the arguments when given, else from the exporter's
    `headwatch_model_sink_tokens` / `headwatch_model_recent_tokens`; PolicyError if neither.
    `bound` is the exporter's VERDICTS__ENTER_BOUND (its metrics do not carry it).
    """
    verdicts = read_verdicts(text, model_name, where)
    sink, recent = verdicts.keep_set(sink_tokens, recent_tokens)
    return KvPolicy(
        verdicts.model_name,
        sink,
        recent,
        verdicts.streaming,
        verdicts.error,
        f"exporter metrics at {where}",
        error_bound=bound,
    )


def to_dict(policy: KvPolicy) -> dict[str, Any]:
    """Return the `headwatch.kv-policy.v1` document of a policy."""
    layers, kv_heads = policy.streaming.shape
    return {
        "format": FORMAT,
        "model_name": policy.model_name,
        "created_timestamp_seconds": round(time.time(), 3),
        "source": policy.source,
        "sink_tokens": policy.sink_tokens,
        "recent_tokens": policy.recent_tokens,
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "eviction_error_bound": policy.error_bound,
        "streaming_share": round(policy.streaming_share, 6),
        "kv_heads": [
            {
                "layer": layer,
                "kv_head": kv,
                "keep": "sink_recent" if policy.streaming[layer, kv] else "all",
                "eviction_error_p95": _rounded(policy.error[layer, kv]),
                "eviction_error_mean": None
                if policy.mean_error is None
                else _rounded(policy.mean_error[layer, kv]),
            }
            for layer in range(layers)
            for kv in range(kv_heads)
        ],
    }


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def write_policy(policy: KvPolicy, out: Path) -> list[Path]:
    """Write policy.json and the DuoAttention pattern folder under `out`; return the files."""
    duo = out / DUO_DIR
    try:
        duo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # --out names a file, or a folder this user cannot write
        raise PolicyError(
            f"expected a folder to write the policy into at {out}, got {exc}"
        ) from exc
    files = [out / "policy.json", duo / "config.json", duo / "full_attention_heads.tsv"]
    files[0].write_text(json.dumps(to_dict(policy), indent=1) + "\n", encoding="utf-8")
    config = {
        "sink_size": policy.sink_tokens,
        "recent_size": policy.recent_tokens,
        "head_compression_ratio": round(policy.streaming_share, 6),
        "source": f"headwatch {FORMAT}: {policy.source}",
    }
    files[1].write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    rows = ["\t".join(f"{v:.6f}" for v in row) for row in policy.duo_scores()]
    files[2].write_text("\n".join(rows) + "\n", encoding="utf-8")
    return files


def read_policy(path: Path) -> KvPolicy:
    """Return the policy stored in a `headwatch.kv-policy.v1` file; raise PolicyError naming what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(f"expected a policy JSON at {path}, got {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PolicyError(
            f"expected format {FORMAT!r} in {path}, got {data.get('format') if isinstance(data, dict) else data!r}"
        )
    try:
        return _policy_from_dict(data)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from exc
    except KeyError as exc:
        raise PolicyError(f"expected the field {exc.args[0]!r} in {path}, got none") from exc
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"expected a well-formed {FORMAT} policy in {path}, got {exc}") from exc


def _policy_from_dict(data: dict[str, Any]) -> KvPolicy:
    """Return the policy of a parsed policy file; KeyError, TypeError or ValueError where malformed."""
    shape = (int(data["num_layers"]), int(data["num_kv_heads"]))
    if min(shape) < 1:
        raise PolicyError(f"expected num_layers and num_kv_heads >= 1, got {shape}")
    streaming = np.zeros(shape, dtype=bool)
    error = np.full(shape, np.nan)
    mean = np.full(shape, np.nan)
    for item in data["kv_heads"]:
        at = (int(item["layer"]), int(item["kv_head"]))
        if not (0 <= at[0] < shape[0] and 0 <= at[1] < shape[1]):
            raise PolicyError(
                f"expected kv_heads entries within (num_layers, num_kv_heads) = {shape}, "
                f"got layer {at[0]}, kv_head {at[1]}"
            )
        streaming[at] = item["keep"] == "sink_recent"
        if item.get("eviction_error_p95") is not None:
            error[at] = float(item["eviction_error_p95"])
        if item.get("eviction_error_mean") is not None:
            mean[at] = float(item["eviction_error_mean"])
    return KvPolicy(
        str(data["model_name"]),
        int(data["sink_tokens"]),
        int(data["recent_tokens"]),
        streaming,
        error,
        str(data["source"]),
        float(data["eviction_error_bound"]),
        mean,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwatch policy", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from-analysis",
        type=Path,
        metavar="JSON",
        help="heads.json of `headwatch analyze` or the demo",
    )
    src.add_argument("--from-metrics", metavar="URL", help="an exporter's /metrics URL")
    p.add_argument(
        "--model-name", help="model_name label to take from /metrics (needed if several)"
    )
    p.add_argument(
        "--sink-tokens",
        type=int,
        default=None,
        help="S for --from-metrics (default: the exporter's headwatch_model_sink_tokens)",
    )
    p.add_argument(
        "--recent-tokens",
        type=int,
        default=None,
        help="R for --from-metrics (default: the exporter's headwatch_model_recent_tokens)",
    )
    p.add_argument(
        "--bound",
        type=float,
        default=0.05,
        help="for --from-metrics: the exporter's VERDICTS__ENTER_BOUND, written to the policy "
        "(default 0.05, the exporter's default)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder to write policy.json and duo_attention/ into",
    )
    return p


def main(argv: list[str]) -> int:
    """Run `headwatch policy`; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0 < args.bound < 1:
        print(f"headwatch policy: expected 0 < --bound < 1, got {args.bound}", file=sys.stderr)
        return 2
    try:
        if args.from_analysis is not None:
            policy = from_summary(read_summary_json(args.from_analysis))
        else:
            text = fetch_metrics(args.from_metrics)
            policy = from_metrics_text(
                text, args.model_name, args.sink_tokens, args.recent_tokens, args.from_metrics,
                args.bound,
            )  # fmt: skip
        files = write_policy(policy, args.out)
    except HeadwatchToolError as exc:
        print(f"headwatch policy: {exc}", file=sys.stderr)
        return 2
    layers, kv = policy.streaming.shape
    print(
        f"{int(policy.streaming.sum())} of {layers * kv} KV heads keep only sink {policy.sink_tokens} "
        f"+ recent {policy.recent_tokens} ({policy.streaming_share:.0%})"
    )
    for f in files:
        print(f"wrote {f}")
    return 0
