# Sourced by the test scripts: where build caches live outside git.
#   REVERSER_CACHE     ${XDG_CACHE_HOME:-~/.cache}/gitops-reverser (shared: content-keyed caches such as real-kube-<hash>)
#   REVERSER_CHECKOUT  this checkout's own sub-directory name for compiled artifacts: the folder's name and a hash of
#                      its path (cargo decides freshness by file times, so two checkouts must never share a target dir)
REVERSER_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/gitops-reverser"
REVERSER_CHECKOUT="$(basename "$PWD")-$(printf '%s' "$PWD" | sha256sum | cut -c1-12)"
