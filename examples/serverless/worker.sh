#!/bin/sh
# A serverless worker without RunPod's SDK: the plain HTTP contract of docs/serverless.md in
# POSIX sh with busybox wget. It echoes each job's input as its output. Make a template that
# runs it, e.g. `template create shw --image busybox -- /bin/sh -c "$(cat worker.sh)"`.
# The daemon gives the worker RUNPOD_WEBHOOK_GET_JOB, RUNPOD_WEBHOOK_POST_OUTPUT,
# RUNPOD_AI_API_KEY and RUNPOD_POD_ID. Each job here takes moments; a handler that runs longer
# than the 15 s lease must also GET RUNPOD_WEBHOOK_PING with ?job_id=<job> while it works.
# No wget -T: busybox 1.35's wget (Debian 12) crashes with it; the daemon answers a take
# within 20 s anyway.
take=$(printf '%s' "$RUNPOD_WEBHOOK_GET_JOB" | sed "s/\$ID/$RUNPOD_POD_ID/")
result=$(printf '%s' "$RUNPOD_WEBHOOK_POST_OUTPUT" | sed "s/\$RUNPOD_POD_ID/$RUNPOD_POD_ID/")
auth="Authorization: $RUNPOD_AI_API_KEY"
while :; do
  # Held up to 20 s by the daemon; empty when no job came.
  job=$(wget -q -O - --header "$auth" "${take}&job_in_progress=0") || { sleep 1; continue; }
  [ -n "$job" ] || continue
  # The daemon's take answer is compact JSON, id first: {"id":"...","input":...}. (A real
  # worker parses it with a JSON library; sed keeps this example to busybox.)
  id=$(printf '%s' "$job" | sed -n 's/^{"id":"\([^"]*\)".*/\1/p')
  input=$(printf '%s' "$job" | sed -n 's/^{"id":"[^"]*","input":\(.*\)}$/\1/p')
  [ -n "$id" ] || { echo "worker.sh: no job id in the take answer" >&2; continue; }
  url=$(printf '%s' "$result" | sed "s/\$ID/$id/")
  # The result goes through a file (printf is the shell's own): a result over 128 KiB would
  # not fit one command-line argument of wget. (The shell holds the job in memory several
  # times over: give the template memory for the inputs it takes.)
  rm -f /tmp/result.json
  if [ -z "$input" ] || ! printf '{"output":{"echo":%s}}' "$input" > /tmp/result.json; then
    printf '{"error":"worker.sh could not read the job"}' > /tmp/result.json
  fi
  wget -q -O /dev/null --header "$auth" --header "Content-Type: application/json" \
    --post-file /tmp/result.json "${url}&isStream=false" ||
    echo "worker.sh: the result of $id was not taken" >&2
done
