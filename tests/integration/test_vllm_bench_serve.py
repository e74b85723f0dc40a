"""vLLM's own serving benchmark (`vllm bench serve --backend openai`) runs unmodified
against our OpenAI-compatible gateway, with an adapter name as the model."""

from __future__ import annotations

import argparse
import json

import pytest

pytestmark = pytest.mark.integration


def test_vllm_bench_serve_against_the_gateway(cluster, assets, tmp_path):
    from http_gateway import HttpGatewayThread
    from vllm.benchmarks.serve import add_cli_args, main

    gw = HttpGatewayThread(cluster.address)
    port = gw.start()
    try:
        p = argparse.ArgumentParser()
        add_cli_args(p)
        args = p.parse_args([
            "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
            "--endpoint", "/v1/completions", "--model", "cid", "--tokenizer", assets["model"],
            "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "8",
            "--num-prompts", "12", "--request-rate", "inf", "--max-concurrency", "4",
            "--ignore-eos", "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", "serve.json", "--disable-tqdm"])
        main(args)
    finally:
        gw.stop()
    result = json.loads((tmp_path / "serve.json").read_text())
    assert result["completed"] == 12 and result.get("failed", 0) == 0
    assert result["total_output_tokens"] == 12 * 8
