"""The fixed instructions of framecast's text-only turns (chapter titles and summaries).

They are data shared by two sides that must agree word for word: the recorded-analysis stages
that ask them and the demo model's training data (`framecast.stages.demo_training.data`), which
teaches the embedded model to answer exactly these. A real MiniCPM-V follows them as written.

Placeholders: `{narrations}` is one line per narration, `[m:ss] text` (media time of its start);
`{chapters}` is one line per chapter, `N. [m:ss-m:ss] title: narrations joined by spaces`.
"""

#: a chapter's title, written from what was narrated in its span (a few words, no final period)
CHAPTER_TITLE_PROMPT = "Give this part of the video a short title. What was narrated:\n{narrations}"

#: the summary of a whole recording, written from its chapters (one or a few sentences)
SUMMARY_PROMPT = "Summarize the whole video in a few sentences. Its chapters:\n{chapters}"

#: a question about a time span answered from the narration log (offline `framecast ask` on a saved
#: session, when the span lies before what the KV cache still holds): `{start}`/`{end}` are m:ss
QUESTION_FROM_LOG_PROMPT = "What was narrated from {start} to {end}:\n{narrations}\nQuestion: {question}"
