# The fuzz targets (fuzz/, cargo-fuzz and libFuzzer on the stable toolchain:
# coverage instrumentation without a sanitizer). Sourced by scripts/bench
# (`scripts/bench fuzz`); scripts/test replays the same checks on the corpus
# without this build (tests/tests/fuzz_corpus.rs).

FUZZ_TARGETS=(manifest unpack pipeline selector agent_messages)

ensure_fuzz_deps() {
  cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
}

# run_fuzz LIBFUZZER_FLAGS...: every target from its checked-in corpus
# (read only: new inputs go to a temp dir), with the given libFuzzer flags
# (-max_total_time=5, -runs=1000000). Prints "TARGET: N executions" and
# fails on the first crash, leaving the input in fuzz/artifacts/TARGET/.
run_fuzz() {
  local work target out runs
  (cd fuzz && cargo fuzz build -s none >/dev/null)
  work=$(mktemp -d -t drover-fuzz-XXXXXX)
  for target in "${FUZZ_TARGETS[@]}"; do
    mkdir -p "$work/$target"
    out="$work/$target.log"
    if ! (cd fuzz && cargo fuzz run -s none "$target" "$work/$target" "corpus/$target" -- "$@" >"$out" 2>&1); then
      tail -n 40 "$out" >&2
      echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
      rm -rf "$work"
      return 1
    fi
    # libFuzzer's last line: "Done N runs in S second(s)".
    runs=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$out" | tail -n 1)
    echo "$target: ${runs:-no summary} (inputs: $(ls "$work/$target" | wc -l) new, $(ls "fuzz/corpus/$target" | wc -l) seeds)"
  done
  rm -rf "$work"
}
