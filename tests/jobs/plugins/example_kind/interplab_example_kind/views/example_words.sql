-- example_words: one row per word of an example run: its index in the spec's words and its token count.
CREATE VIEW example_words AS
SELECT run_id, word_index, word, n_tokens
FROM {{example_words}};
