"""mangrove's echo logprobs against transformers' BitNetForCausalLM on the same checkpoint.

For each checkpoint folder (written by `mangrove gen-model`): load it in transformers unmodified
(BitNetForCausalLM.from_pretrained), take the log-softmax of its logits at every position of a
fixed prompt, then start `mangrove serve` on each backend, ask it to score the same prompt
(`echo`, `logprobs: 1`, `max_tokens: 0`, token-id prompt) and report the largest absolute
difference per position. Prints one JSON line per (checkpoint, backend) and writes them to OUT.

usage: python3 scripts/hf_logprobs.py MANGROVE_BIN OUT.json DIR[:BACKENDS] ...
       (BACKENDS: comma-separated, default cpu; cuda needs NVRTC and a tuning DB)
"""
import json
import os
import subprocess
import sys
import time
import traceback
import urllib.request


def hf_logprobs(model_dir, ids):
    import torch
    import transformers
    from transformers import BitNetForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BitNetForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))], transformers.__version__, str(model.config.head_dim)


def serve(binary, model_dir, backend, db):
    args = [binary, "serve", "--model", model_dir, "--port", "0", "--backend", backend]
    if backend == "cuda":
        args += ["--tuning-db", db, "--max-batch", "1"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    for line in p.stderr:
        if "serving" in line:
            return p, line.split("http://")[1].split()[0]
        if time.time() - t0 > 300:
            break
    p.kill()
    raise RuntimeError(f"serve {backend} did not start: rc {p.wait()}")


def score(addr, ids):
    body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0, "return_tokens_as_token_ids": True}
    req = urllib.request.Request(f"http://{addr}/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        v = json.load(r)
    lp = v["choices"][0]["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in ids], lp["tokens"]
    assert lp["token_logprobs"][0] is None
    return lp["token_logprobs"][1:]


def main():
    binary, out, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
    db = os.environ.get("TUNING_DB", "tuning_db/h200")
    # <|begin_of_text|> then "Hello, world! The quick brown fox jumps." as byte ids.
    rows = []
    for spec in specs:
        model_dir, _, backends = spec.partition(":")
        cfg = json.load(open(os.path.join(model_dir, "config.json")))
        bos = cfg.get("bos_token_id", 0)
        ids = [bos] + list(b"Hello, world! The quick brown fox jumps over the lazy dog.")
        try:
            want, version, head_dim = hf_logprobs(model_dir, ids)
        except Exception as e:
            traceback.print_exc()
            rows.append({"model": model_dir, "transformers": "failed", "error": repr(e)})
            continue
        for backend in (backends or "cpu").split(","):
            row = {"model": model_dir, "backend": backend, "transformers": version, "head_dim": head_dim, "positions": len(want)}
            try:
                p, addr = serve(binary, model_dir, backend, db)
                try:
                    got = score(addr, ids)
                finally:
                    p.terminate()
                    p.wait(timeout=30)
                diffs = [abs(a - b) for a, b in zip(got, want)]
                row.update({"max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs), "worst_position": 1 + diffs.index(max(diffs))})
            except Exception as e:
                traceback.print_exc()
                row["error"] = repr(e)
            print(json.dumps(row), flush=True)
            rows.append(row)
    json.dump(rows, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
