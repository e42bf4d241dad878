# The minimal test guest's reader of its cloud-init seed (scripts/vm-test-fixture): the
# documents are JSON (what gpuvisor writes; a subset of YAML); prints shell calls
# (set_hostname, do_mount, write_file, run_argv, run_sh) with every value single-quoted, so a
# value is never code. Order: hostname, mounts, write_files, runcmd (cloud-init's order).
BEGIN { RS = "\001" }
{ doc = doc $0 }
END {
  sub(/^#cloud-config\n/, "", doc)
  pos = 1; n = length(doc)
  value("")
  printf "%s%s%s%s", H, M, W, R
}
function q(s) { gsub(/'/, "'\"'\"'", s); return "'" s "'" }
function ws() { while (pos <= n && index(" \t\r\n", substr(doc, pos, 1))) pos++ }
function value(path,   c, start) {
  ws(); c = substr(doc, pos, 1)
  if (c == "{") { object(path); return }
  if (c == "[") { array(path); return }
  if (c == "\"") { leaf(path, str()); return }
  start = pos
  while (pos <= n && !index(",]} \t\r\n", substr(doc, pos, 1))) pos++
  leaf(path, substr(doc, start, pos - start))
}
function object(path,   k, c) {
  pos++; ws()
  if (substr(doc, pos, 1) == "}") { pos++; done(path); return }
  while (pos <= n) {
    ws(); k = str(); ws(); pos++
    value(path == "" ? k : path "." k)
    ws(); c = substr(doc, pos, 1); pos++
    if (c != ",") break
  }
  done(path)
}
function array(path,   i, c) {
  pos++; ws()
  if (substr(doc, pos, 1) == "]") { pos++; done(path); return }
  i = 0
  while (pos <= n) {
    value(path "." i); i++
    ws(); c = substr(doc, pos, 1); pos++
    if (c != ",") break
  }
  done(path)
}
function hexval(h,   i, v) {
  v = 0
  for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789abcdef", tolower(substr(h, i, 1))) - 1
  return v
}
function utf8(c) {
  if (c < 128) return sprintf("%c", c)
  if (c < 2048) return sprintf("%c%c", 192 + int(c / 64), 128 + c % 64)
  if (c < 65536) return sprintf("%c%c%c", 224 + int(c / 4096), 128 + int(c / 64) % 64, 128 + c % 64)
  return sprintf("%c%c%c%c", 240 + int(c / 262144), 128 + int(c / 4096) % 64, 128 + int(c / 64) % 64, 128 + c % 64)
}
function str(   out, c) {
  pos++; out = ""
  while (pos <= n) {
    c = substr(doc, pos, 1)
    if (c == "\"") { pos++; return out }
    if (c == "\\") {
      c = substr(doc, pos + 1, 1); pos += 2
      if (c == "n") out = out "\n"
      else if (c == "t") out = out "\t"
      else if (c == "r") out = out "\r"
      else if (c == "b") out = out "\b"
      else if (c == "f") out = out "\f"
      else if (c == "u") { out = out utf8(hexval(substr(doc, pos, 4))); pos += 4 }
      else if (c == "U") { out = out utf8(hexval(substr(doc, pos, 8))); pos += 8 }
      else out = out c
      continue
    }
    out = out c; pos++
  }
  return out
}
function leaf(path, v) {
  L[path] = v
  if (path == "local-hostname") H = H "set_hostname " q(v) "\n"
  if (path ~ /^runcmd\.[0-9]+$/) R = R "run_sh " q(v) "\n"
}
function done(path,   j, line) {
  if (path ~ /^mounts\.[0-9]+$/) M = M "do_mount " q(L[path ".0"]) " " q(L[path ".1"]) "\n"
  if (path ~ /^write_files\.[0-9]+$/)
    W = W "write_file " q(L[path ".path"]) " " q(L[path ".permissions"]) " " q(L[path ".content"]) "\n"
  if (path ~ /^runcmd\.[0-9]+$/) {
    line = "run_argv"
    for (j = 0; (path "." j) in L; j++) line = line " " q(L[path "." j])
    R = R line "\n"
  }
}
