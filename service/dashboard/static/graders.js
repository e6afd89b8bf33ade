// Grader configs offered as starting points by the job form and the grader playground.

export const EXACT = { type: "string_check", name: "exact", input: "{{sample.output_text}}", reference: "{{item.answer}}", operation: "eq" };
export const CONTAINS = { type: "string_check", name: "contains", input: "{{sample.output_text}}", reference: "{{item.answer}}", operation: "ilike" };
export const FUZZY = { type: "text_similarity", name: "close", input: "{{sample.output_text}}", reference: "{{item.answer}}", evaluation_metric: "fuzzy_match" };
export const PYTHON = {
  type: "python",
  name: "close_number",
  source: "def grade(sample, item):\n    try:\n        got = float(sample['output_text'].strip())\n    except ValueError:\n        return 0.0\n    return max(0.0, 1.0 - abs(got - float(item['answer'])) / 10)\n",
};

export const PRESETS = {
  "string_check (exact answer)": EXACT,
  "string_check (contains the answer, any case)": CONTAINS,
  "text_similarity (fuzzy_match)": FUZZY,
  "python (number close to the answer)": PYTHON,
  "multi (exact + fuzzy)": { type: "multi", name: "blend", graders: { exact: EXACT, close: FUZZY }, calculate_output: "0.7 * exact + 0.3 * close" },
};
