"""The data toolkit: dedup, scrub, filter, synth, contamination and stats over files of any supported format,
each a `tunelab data <step>` command and a function; `pipeline` chains them from YAML."""
