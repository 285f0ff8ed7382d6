"""The review web UI (part 4): server-rendered pages over catalog.read and catalog.annotations.

No build step: Jinja2 templates, one small script and the stylesheets are served by the app itself.
Corpus text is untrusted: templates autoescape everything, and the Content-Security-Policy allows
scripts from this origin only, so a planted ``<script>`` in a prefix is shown and never run.
"""
