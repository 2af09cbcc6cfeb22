"""Helpers every stage may use; they import no stage and never Keras or TensorFlow.

    files   atomic writes (:func:`replace_atomically`, :func:`write_json_atomic`),
            :func:`read_json`, :func:`file_sha256`
    log     :func:`configure_logging`: where the library's log lines go (the CLI calls it)
"""
