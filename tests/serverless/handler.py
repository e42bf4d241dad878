# The test worker: RunPod's worker SDK, unchanged, with a handler chosen by $HANDLER.
#   echo   (default) returns its input (after input.sleep seconds; raises on input.fail);
#          async, taking up to $CONCURRENCY jobs at once (RunPod's concurrency_modifier)
#   stream yields input.n chunks, input.gap seconds apart
import asyncio
import os
import time

import runpod


async def echo(job):
    inp = job["input"]
    if inp.get("sleep"):
        await asyncio.sleep(float(inp["sleep"]))
    if inp.get("fail"):
        raise ValueError("asked to fail")
    return {"echo": inp, "worker": os.environ.get("RUNPOD_POD_ID")}


def stream(job):
    inp = job["input"]
    for i in range(int(inp.get("n", 3))):
        time.sleep(float(inp.get("gap", 0.1)))
        yield {"i": i}


concurrency = int(os.environ.get("CONCURRENCY", "1"))
runpod.serverless.start({
    "handler": stream if os.environ.get("HANDLER") == "stream" else echo,
    "return_aggregate_stream": True,
    "concurrency_modifier": lambda _current: concurrency,
})
