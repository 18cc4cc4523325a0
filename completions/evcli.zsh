#compdef evcli

_evcli_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _EVCLI_COMPLETE=complete_zsh evcli)
}

compdef _evcli_completion evcli
