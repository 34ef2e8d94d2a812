from twisted.application.service import ServiceMaker

nextclaude = ServiceMaker(
    "NextClaude",
    "nextclaude.tap",
    "A cache-aware multi-account proxy for Claude Code.",
    "nextclaude",
)
