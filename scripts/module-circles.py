#!/usr/bin/env python3
"""The import graph of each crate's modules (non-test code) and its circles (strongly connected components).

Usage: scripts/module-circles.py [SRC_DIR ...] [-v]   (default: the agent's crates, agent-api/src agent-core/src
agent/src; -v lists every module's imports)
Edges: `crate::`, `super::`, `self::` and child-module paths, in `use` items and inline paths. A path that ends at
the crate root (a name the root re-exports from another crate, e.g. `crate::rules` in the agent, which is
`reverser_agent_core::rules`) is no edge: between crates, cargo already forbids circles. Exits 1 when a circle
exists in any crate, so it can guard the one-way layers described in ARCHITECTURE.md.
"""
import os, re, sys
args = [a for a in sys.argv[1:] if a != "-v"]
roots = args or ["agent-api/src", "agent-core/src", "agent/src"]
def graph(root):
  global mods
  mods = {}  # module path tuple -> file
  for d, _, fs in os.walk(root):
      for f in fs:
          if not f.endswith(".rs"): continue
          p = os.path.relpath(os.path.join(d, f), root)
          parts = p[:-3].split(os.sep)
          if parts[0] in ("main", "bin"): continue
          if parts[-1] == "mod": parts = parts[:-1]
          if parts == ["lib"]: parts = []
          if any(x == "tests" or x.endswith("_tests") for x in parts): continue  # test modules
          mods[tuple(parts)] = os.path.join(d, f)
  # names a module takes from another crate (`pub use reverser_x::{a, b}`, inline `pub mod a { pub use … }`)
  global ext
  ext = {}
  for m, f in mods.items():
    src = strip(open(f).read())
    names = set(re.findall(r"\bpub mod (\w+)\s*\{", src))
    for u in re.finditer(r"\bpub use\s+(reverser_\w+::[^;]+);", src):
      names |= {p.split("::")[-1] for p in expand(u.group(1))}
    ext[m] = names
  edges = {m: set() for m in mods}
  for m, f in mods.items():
      src = strip(open(f).read())
      paths = []
      for u in re.finditer(r"\buse\s+([^;]+);", src):
          paths += expand(u.group(1))
      paths += re.findall(r"\b((?:crate|super|self)(?:::\w+)+)", src)
      children = {k[-1] for k in mods if len(k) == len(m) + 1 and k[: len(m)] == m}
      paths += [c + "::x" for c in children if re.search(r"(?<![:\w])" + c + r"::", src)]
      for p in paths:
          t = resolve(m, p)
          if t is not None and t != m and t != () and t in mods: edges[m].add(t)
  def name(m): return "::".join(m) or "lib"
  # Tarjan
  idx, low, on, st, out, c = {}, {}, set(), [], [], [0]
  sys.setrecursionlimit(10000)
  def sc(v):
      idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
      for w in edges[v]:
          if w not in idx: sc(w); low[v] = min(low[v], low[w])
          elif w in on: low[v] = min(low[v], idx[w])
      if low[v] == idx[v]:
          comp = []
          while True:
              w = st.pop(); on.discard(w); comp.append(w)
              if w == v: break
          out.append(comp)
  for v in mods:
      if v not in idx: sc(v)
  cyc = [sorted(name(x) for x in comp) for comp in out if len(comp) > 1]
  if "-v" in sys.argv:
      for m in sorted(mods):
          print(name(m), "->", ", ".join(sorted(name(t) for t in edges[m])))
  print(f"{root}: {len(mods)} modules, {sum(len(e) for e in edges.values())} edges, {len(cyc)} import circles")
  for comp in cyc: print("  circle:", " ".join(comp))
  return len(cyc)
def strip(src):
    # drop the test module: everything from `#[cfg(test)]` (or the `test-support` feature's cfg) followed by `mod tests`/`mod test_support`
    src = re.sub(r"#\[cfg\((test|any\(test, feature = \"test-support\"\))\)\]\s*(pub(\(crate\))?\s+)?mod \w+\s*\{.*", "", src, flags=re.S)
    src = re.sub(r"#\[cfg\(test\)\]\s*mod \w+;", "", src)
    src = re.sub(r"//[^\n]*", "", src)
    src = re.sub(r'"(\\.|[^"\\])*"', '""', src)
    return src
def expand(tree):
    # expand a use tree `a::{b, c::{d}}` into paths
    tree = tree.strip()
    m = re.match(r"^(.*?)::\{(.*)\}$", tree, re.S)
    if not m:
        return [tree.split(" as ")[0].strip()]
    prefix, inner = m.group(1), m.group(2)
    out, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "{": depth += 1
        if ch == "}": depth -= 1
        if ch == "," and depth == 0:
            out.append(cur); cur = ""
        else: cur += ch
    out.append(cur)
    res = []
    for o in out:
        o = o.strip()
        if not o: continue
        for e in expand(o):
            res.append(prefix if e == "self" else prefix + "::" + e)
    return res
def resolve(mod, path):
    segs = [s for s in path.split("::") if s]
    if not segs: return None
    if segs[0] == "crate": base, segs = [], segs[1:]
    elif segs[0] == "super":
        base = list(mod)
        while segs and segs[0] == "super": base, segs = base[:-1], segs[1:]
    elif segs[0] == "self": base, segs = list(mod), segs[1:]
    elif tuple(list(mod) + [segs[0]]) in mods: base = list(mod)  # child module path
    else: return None
    if segs and segs[0] in ext.get(tuple(base), ()): return None  # another crate's module, re-exported
    best = tuple(base)
    for i in range(len(segs)):
        cand = tuple(base + segs[: i + 1])
        if cand in mods: best = cand
        else: break
    return best
sys.exit(1 if sum(graph(r) for r in roots) else 0)
