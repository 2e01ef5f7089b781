// experiments/report.cpp: turns what experiments/run.sh collects into the README's table and pictures.
// Standard C++17 only (no project headers, no libraries): it reads text files and writes Markdown and SVG.
//
//   report table RESULTS_TSV              the results table in Markdown: mean and min-max over seeds
//   report prior PRIOR_CSV OUT_SVG LAYER TITLE
//                                         the learned prior of one layer, taken apart (GOAT.md section 3):
//                                         u_h(j), kappa_h(delta), K_ij = kappa_h(i - j) + u_h(j) and the
//                                         causal prior it induces, softmax over j <= i of K_ij
//   report sink GOAT_CSV NONE_CSV OUT_SVG TITLE
//                                         the sink picture (GOAT.md section 6): mass on token 0 against the
//                                         content range of each query, GOAT next to no-prior attention, and a
//                                         summary by content-range quartile on stdout
//   report contexts RESULTS_TSV OUT_SVG TITLE
//                                         loss against the context multiplier m, one line per prior (mean over
//                                         seeds), one panel per data set
//   report curves OUT_SVG TITLE LOG LABEL [LOG LABEL ...]
//                                         validation loss against the step, one line per train_tiny log (runs
//                                         with the same --val-every), and each run's last value on stdout
//
// Inputs: RESULTS_TSV has one line per run and context, "data prior seed mult ctx loss" separated by tabs
// (loss may be "n/a"), written by run.sh from train_tiny's "eval ctx=... mult=... loss=..." lines. PRIOR_CSV
// and the sink CSVs are train_tiny's --prior-csv and --sink-stats files (their headers name the columns).
//
// Read in this order: utilities (CSV, colours, SVG helpers), table, prior, sink, main.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

// ----------------------------------------------------------------------------------------------------------
// utilities

[[noreturn]] void fail(const std::string& msg) {
    std::fprintf(stderr, "report: %s\n", msg.c_str());
    std::exit(1);
}

std::vector<std::string> split(const std::string& line, char sep) {
    std::vector<std::string> out;
    std::string cell;
    std::istringstream in(line);
    while (std::getline(in, cell, sep)) out.push_back(cell);
    if (!line.empty() && line.back() == sep) out.push_back("");
    return out;
}

// Every line of a text file split at sep; header lines (first cell not a number where numbers are expected)
// are the caller's business. A missing file is an error that names it.
std::vector<std::vector<std::string>> read_table(const std::string& path, char sep) {
    std::ifstream f(path);
    if (!f) fail("cannot open '" + path + "'");
    std::vector<std::vector<std::string>> rows;
    std::string line;
    while (std::getline(f, line))
        if (!line.empty()) rows.push_back(split(line, sep));
    return rows;
}

double to_number(const std::string& s, const std::string& where) {
    char* end = nullptr;
    double x = std::strtod(s.c_str(), &end);
    if (s.empty() || *end != '\0') fail("'" + s + "' is not a number (" + where + ")");
    return x;
}

// A perceptual sequential colour map (dark blue -> teal -> yellow, like viridis), t in [0, 1].
std::string colour(double t) {
    static const double stops[5][3] = {{68, 1, 84}, {59, 82, 139}, {33, 145, 140}, {94, 201, 98}, {253, 231, 37}};
    t = std::min(1.0, std::max(0.0, t)) * 4;
    const int k = std::min(3, (int)t);
    const double f = t - k;
    char buf[8];
    std::snprintf(buf, sizeof(buf), "#%02x%02x%02x", (int)std::lround(stops[k][0] + f * (stops[k + 1][0] - stops[k][0])),
                  (int)std::lround(stops[k][1] + f * (stops[k + 1][1] - stops[k][1])),
                  (int)std::lround(stops[k][2] + f * (stops[k + 1][2] - stops[k][2])));
    return buf;
}
const char* const HEAD_COLOURS[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"};

struct Svg {
    std::string body;
    void raw(const std::string& text) { body += text; }
    // formatted text of at most 4 kB (long path data goes through raw)
    void add(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
        char buf[4096];
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        body += buf;
    }
    void save(const std::string& path, int W, int H) const {
        FILE* f = std::fopen(path.c_str(), "w");
        if (!f) fail("cannot write '" + path + "'");
        std::fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
                        "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n%s</svg>\n", W, H, body.c_str());
        if (std::fclose(f) != 0) fail("cannot write '" + path + "'");
    }
};

// Line plot of several series over x = 0..n-1 in the box (x0, y0, w, h), with the y range written at the left;
// the series are named "head k" unless labels are given, and the x axis runs 0..n-1 unless x_start, x_end say
// otherwise.
void line_panel(Svg* svg, int x0, int y0, int w, int h, const std::string& title, const std::string& xlabel,
                const std::vector<std::vector<double>>& series, const std::vector<std::string>& labels = {},
                const std::string& x_start = "0", const std::string& x_end = "") {
    double lo = 1e300, hi = -1e300;
    size_t n = 0;
    for (const auto& s : series) {
        n = std::max(n, s.size());
        for (double v : s) { lo = std::min(lo, v); hi = std::max(hi, v); }
    }
    if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
    svg->add("<text x=\"%d\" y=\"%d\" font-size=\"12\">%s</text>\n", x0, y0 - 6, title.c_str());
    svg->add("<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#999\"/>\n", x0, y0, w, h);
    svg->add("<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%.2f</text>\n", x0 - 4, y0 + 10, hi);
    svg->add("<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%.2f</text>\n", x0 - 4, y0 + h, lo);
    svg->add("<text x=\"%d\" y=\"%d\">%s</text><text x=\"%d\" y=\"%d\" text-anchor=\"end\">%s</text>\n", x0, y0 + h + 13,
             x_start.c_str(), x0 + w, y0 + h + 13, x_end.empty() ? std::to_string(n - 1).c_str() : x_end.c_str());
    svg->add("<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", x0 + w / 2, y0 + h + 13, xlabel.c_str());
    for (size_t k = 0; k < series.size(); ++k) {
        svg->add("<polyline fill=\"none\" stroke-width=\"1.5\" stroke=\"%s\" points=\"", HEAD_COLOURS[k % 8]);
        for (size_t x = 0; x < series[k].size(); ++x)
            svg->add("%.1f,%.1f ", x0 + (double)w * x / std::max<size_t>(1, n - 1), y0 + h - h * (series[k][x] - lo) / (hi - lo));
        svg->add("\"/>\n");
        const std::string name = k < labels.size() ? labels[k] : "head " + std::to_string(k);
        svg->add("<text x=\"%d\" y=\"%d\" fill=\"%s\" text-anchor=\"end\">%s</text>\n", x0 + w - 6, y0 + 14 + 12 * (int)k,
                 HEAD_COLOURS[k % 8], name.c_str());
    }
}

// Heat map of the lower triangle of an n x n matrix (row i down, column j across; j > i masked, drawn grey),
// cell size c pixels, colour range [lo, hi]. Cells are quantised to LEVELS colours; each run of equal colour
// along a row is one stroked segment, and each colour is one <path>, so a map stays a few tens of kB.
void heat_panel(Svg* svg, int x0, int y0, int c, const std::string& title, const std::vector<double>& m, int n,
                double lo, double hi, const std::string& lo_label, const std::string& hi_label) {
    constexpr int LEVELS = 32;
    std::vector<std::string> paths(LEVELS);
    auto level = [&](int i, int j) {
        const double t = hi > lo ? (m[(size_t)i * n + j] - lo) / (hi - lo) : 0.5;
        return std::min(LEVELS - 1, std::max(0, (int)(t * LEVELS)));
    };
    for (int i = 0; i < n; ++i)
        for (int j = 0; j <= i;) {
            const int q = level(i, j);
            int e = j + 1;
            while (e <= i && level(i, e) == q) ++e;
            char seg[48];
            std::snprintf(seg, sizeof(seg), "M%d %gh%d", x0 + j * c, y0 + i * c + c / 2.0, (e - j) * c);
            paths[q] += seg;
            j = e;
        }
    svg->add("<text x=\"%d\" y=\"%d\" font-size=\"12\">%s</text>\n", x0, y0 - 6, title.c_str());
    svg->add("<path d=\"M%d %dL%d %dL%d %dz\" fill=\"#eee\"/>\n", x0 + c, y0, x0 + n * c, y0, x0 + n * c, y0 + (n - 1) * c);
    for (int q = 0; q < LEVELS; ++q)
        if (!paths[q].empty())
            svg->raw("<path fill=\"none\" stroke-width=\"" + std::to_string(c) + "\" stroke=\"" + colour((q + 0.5) / LEVELS) +
                     "\" d=\"" + paths[q] + "\"/>\n");
    svg->add("<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#999\"/>\n", x0, y0, n * c, n * c);
    svg->add("<text x=\"%d\" y=\"%d\">query i down, key j across (0..%d)</text>\n", x0, y0 + n * c + 13, n - 1);
    // colour bar
    const int bx = x0 + n * c + 10, bh = n * c;
    for (int k = 0; k < 32; ++k)
        svg->add("<rect x=\"%d\" y=\"%.1f\" width=\"10\" height=\"%.1f\" fill=\"%s\"/>\n", bx, y0 + bh - (k + 1) * bh / 32.0,
                 bh / 32.0 + 0.5, colour((k + 0.5) / 32).c_str());
    svg->add("<text x=\"%d\" y=\"%d\">%s</text>\n", bx + 13, y0 + 9, hi_label.c_str());
    svg->add("<text x=\"%d\" y=\"%d\">%s</text>\n", bx + 13, y0 + bh, lo_label.c_str());
}

// ----------------------------------------------------------------------------------------------------------
// table: mean and min-max over seeds, one row per (data, prior), one column per context

int cmd_table(const std::string& path) {
    struct Cell { std::vector<double> losses; int na = 0; };
    std::vector<std::string> row_order;             // "data\tprior" in order of first appearance
    std::vector<int> mults;                         // multipliers in order of first appearance
    std::map<int, int> ctx_of;                      // mult -> context
    std::map<std::string, std::map<int, Cell>> cells;
    std::map<std::string, std::vector<std::string>> seeds;
    for (const auto& r : read_table(path, '\t')) {
        if (r.size() != 6) fail("'" + path + "': expected 6 tab-separated columns: data prior seed mult ctx loss");
        const std::string key = r[0] + "\t" + r[1];
        const int mult = (int)to_number(r[3], path), ctx = (int)to_number(r[4], path);
        if (!cells.count(key)) row_order.push_back(key);
        if (std::find(mults.begin(), mults.end(), mult) == mults.end()) mults.push_back(mult);
        ctx_of[mult] = ctx;
        Cell& c = cells[key][mult];
        if (r[5] == "n/a") ++c.na;
        else c.losses.push_back(to_number(r[5], path));
        std::vector<std::string>& s = seeds[key];
        if (std::find(s.begin(), s.end(), r[2]) == s.end()) s.push_back(r[2]);
    }
    if (row_order.empty()) fail("'" + path + "' holds no results");
    std::printf("| data | prior | seeds |");
    for (int m : mults) std::printf(" L = %d (%dx) |", ctx_of[m], m);
    std::printf("\n|---|---|---|");
    for (size_t k = 0; k < mults.size(); ++k) std::printf("---|");
    std::printf("\n");
    for (const std::string& key : row_order) {
        const size_t tab = key.find('\t');
        std::printf("| %s | %s | %zu |", key.substr(0, tab).c_str(), key.substr(tab + 1).c_str(), seeds[key].size());
        for (int m : mults) {
            const Cell& c = cells[key][m];
            if (c.losses.empty()) {
                std::printf(" %s |", c.na ? "n/a (learned positions end at T_train)" : "-");
                continue;
            }
            double sum = 0, lo = 1e300, hi = -1e300;
            for (double x : c.losses) { sum += x; lo = std::min(lo, x); hi = std::max(hi, x); }
            std::printf(" %.3f (%.3f-%.3f)%s |", sum / c.losses.size(), lo, hi,
                        c.losses.size() < seeds[key].size() ? " (missing seeds)" : "");
        }
        std::printf("\n");
    }
    return 0;
}

// ----------------------------------------------------------------------------------------------------------
// prior: one layer's learned prior, taken apart

int cmd_prior(const std::string& csv, const std::string& out, int layer, const std::string& title) {
    std::map<int, std::vector<double>> kappa, u;   // head -> table over x
    for (const auto& r : read_table(csv, ',')) {
        if (r.size() != 5) fail("'" + csv + "': expected 5 columns: layer,head,table,x,value");
        if (r[0] == "layer") continue;   // header
        if ((int)to_number(r[0], csv) != layer) continue;
        const int h = (int)to_number(r[1], csv), x = (int)to_number(r[3], csv);
        std::vector<double>& t = r[2] == "kappa" ? kappa[h] : u[h];
        if ((int)t.size() <= x) t.resize(x + 1, 0.0);
        t[x] = to_number(r[4], csv);
    }
    if (kappa.empty() || u.empty()) fail("'" + csv + "' has no tables for layer " + std::to_string(layer));
    const int H = (int)kappa.size(), n = (int)u.begin()->second.size();
    const int cell = std::max(1, 256 / n), side = cell * n;
    const int W = 2 * side + 420, top = 60, line_h = 170, row_h = side + 50;
    auto num = [](const char* fmt, double x) { char b[32]; std::snprintf(b, sizeof(b), fmt, x); return std::string(b); };
    Svg svg;
    svg.add("<text x=\"10\" y=\"20\" font-size=\"14\">%s</text>\n", title.c_str());
    svg.add("<text x=\"10\" y=\"38\">layer %d. K_ij = kappa_h(i - j) + u_h(j); the causal prior is softmax over j &lt;= i "
            "of K_ij (what attention does when the content scores carry no signal).</text>\n", layer);
    std::vector<std::vector<double>> us, ks;
    for (int h = 0; h < H; ++h) { us.push_back(u[h]); ks.push_back(kappa[h]); }
    line_panel(&svg, 60, top + 20, side + 100, line_h - 50, "u_h(j), the key-only (sink) term", "key position j", us);
    line_panel(&svg, 60 + side + 190, top + 20, side + 100, line_h - 50, "kappa_h(delta), the relative term", "delta = i - j", ks);
    for (int h = 0; h < H; ++h) {
        // K and log10 P, P = softmax over j <= i of K_ij (log scale: P spans orders of magnitude across rows)
        std::vector<double> K((size_t)n * n, 0.0), logP((size_t)n * n, 0.0);
        double klo = 1e300, khi = -1e300, plo = 1e300, phi = -1e300;
        for (int i = 0; i < n; ++i) {
            double mx = -1e300, sum = 0;
            for (int j = 0; j <= i; ++j) {
                K[(size_t)i * n + j] = kappa[h][i - j] + u[h][j];
                klo = std::min(klo, K[(size_t)i * n + j]);
                khi = std::max(khi, K[(size_t)i * n + j]);
                mx = std::max(mx, K[(size_t)i * n + j]);
            }
            for (int j = 0; j <= i; ++j) sum += std::exp(K[(size_t)i * n + j] - mx);
            for (int j = 0; j <= i; ++j) {
                logP[(size_t)i * n + j] = (K[(size_t)i * n + j] - mx - std::log(sum)) / std::log(10.0);
                plo = std::min(plo, logP[(size_t)i * n + j]);
                phi = std::max(phi, logP[(size_t)i * n + j]);
            }
        }
        double mass0 = 0, mass0_min = 1;   // the causal prior's mass on the first key, rows i >= 1
        for (int i = 1; i < n; ++i) {
            mass0 += std::pow(10.0, logP[(size_t)i * n]);
            mass0_min = std::min(mass0_min, std::pow(10.0, logP[(size_t)i * n]));
        }
        std::printf("prior layer %d head %d: causal prior's mass on j = 0, rows 1..%d: mean %.3f, min %.3f\n", layer, h,
                    n - 1, mass0 / std::max(1, n - 1), mass0_min);
        const int y = top + line_h + 20 + h * row_h;
        heat_panel(&svg, 60, y, cell, "head " + std::to_string(h) + ": total log-prior K_ij", K, n, klo, khi,
                   num("%.2f", klo), num("%.2f", khi));
        heat_panel(&svg, 60 + side + 190, y, cell, "head " + std::to_string(h) + ": causal prior softmax_j K_ij (log colour scale)",
                   logP, n, plo, phi, num("%.1e", std::pow(10.0, plo)), num("%.1e", std::pow(10.0, phi)));
    }
    svg.save(out, W, top + line_h + 20 + H * row_h);
    std::printf("prior picture (layer %d, %d heads, T = %d) written to %s\n", layer, H, n, out.c_str());
    return 0;
}

// ----------------------------------------------------------------------------------------------------------
// sink: mass on token 0 against the content range

struct SinkPoint { int layer, head, i; double mass0, range; };

std::vector<SinkPoint> read_sink(const std::string& csv) {
    std::vector<SinkPoint> pts;
    for (const auto& r : read_table(csv, ',')) {
        if (r.size() != 6) fail("'" + csv + "': expected 6 columns: layer,head,seq,i,mass_on_token0,content_range");
        if (r[0] == "layer") continue;
        pts.push_back({(int)to_number(r[0], csv), (int)to_number(r[1], csv), (int)to_number(r[3], csv),
                       to_number(r[4], csv), to_number(r[5], csv)});
    }
    if (pts.empty()) fail("'" + csv + "' holds no rows");
    return pts;
}

// Printed per model: rows, mean mass on token 0, the mass uniform attention would give (1/(i+1), averaged), and
// the mean mass in each quartile of the content range (quartiles of that model's own rows), each next to its
// uniform value: early queries have both a small range and a large 1/(i+1), so the bare mean would mislead.
void sink_summary(const std::string& name, const std::vector<SinkPoint>& pts) {
    double mass = 0, uniform = 0, over_half = 0;
    for (const SinkPoint& p : pts) {
        mass += p.mass0;
        uniform += 1.0 / (p.i + 1);
        over_half += p.mass0 > 0.5;
    }
    std::vector<SinkPoint> s = pts;
    std::sort(s.begin(), s.end(), [](const SinkPoint& a, const SinkPoint& b) { return a.range < b.range; });
    std::printf("sink %-5s rows %zu | mean mass on token 0 %.3f (uniform attention would give %.3f) | rows with mass > 0.5: %.1f%% | "
                "mean mass by content-range quartile (range at the quartile's upper edge):",
                name.c_str(), pts.size(), mass / pts.size(), uniform / pts.size(), 100.0 * over_half / pts.size());
    for (int q = 0; q < 4; ++q) {
        const size_t a = s.size() * q / 4, b = s.size() * (q + 1) / 4;
        double m = 0, un = 0;
        for (size_t k = a; k < b; ++k) { m += s[k].mass0; un += 1.0 / (s[k].i + 1); }
        std::printf(" Q%d %.3f [uniform %.3f] (w <= %.2f)", q + 1, b > a ? m / (b - a) : NAN, b > a ? un / (b - a) : NAN,
                    s[b - 1].range);
    }
    std::printf("\n");
    // the sink metric of Gu et al. (2024, "When attention sink emerges"): the share of heads whose mean attention on
    // the first token, over their queries, exceeds 0.3
    std::map<std::pair<int, int>, std::pair<double, int>> heads;
    for (const SinkPoint& p : pts) { heads[{p.layer, p.head}].first += p.mass0; heads[{p.layer, p.head}].second += 1; }
    int sinks = 0;
    double top = 0;
    for (const auto& h : heads) {
        const double m = h.second.first / h.second.second;
        sinks += m > 0.3;
        top = std::max(top, m);
    }
    std::printf("sink %-5s heads whose mean mass on token 0 exceeds 0.3: %d of %zu (largest head mean %.3f)\n",
                name.c_str(), sinks, heads.size(), top);
    int L = 0;
    for (const SinkPoint& p : pts) L = std::max(L, p.layer + 1);
    for (int l = 0; l < L; ++l) {
        double m = 0, w = 0;
        int k = 0;
        for (const SinkPoint& p : pts)
            if (p.layer == l) { m += p.mass0; w += p.range; ++k; }
        std::printf("sink %-5s layer %d: mean mass on token 0 %.3f, mean content range %.2f\n", name.c_str(), l, m / k, w / k);
    }
}

int cmd_sink(const std::string& goat_csv, const std::string& none_csv, const std::string& out, const std::string& title) {
    const std::vector<SinkPoint> models[2] = {read_sink(goat_csv), read_sink(none_csv)};
    const char* names[2] = {"GOAT (learned prior)", "no prior (standard attention)"};
    sink_summary("goat", models[0]);
    sink_summary("none", models[1]);
    double xmax = 0;
    for (const auto& m : models)
        for (const SinkPoint& p : m) xmax = std::max(xmax, p.range);
    xmax = xmax > 0 ? xmax * 1.02 : 1;
    const int pw = 420, ph = 300, mx = 60, top = 80, W = 2 * (pw + mx) + 40, H = top + ph + 70;
    constexpr size_t MAX_POINTS = 3000;   // per panel; a fixed stride keeps the file small and the picture honest
    Svg svg;
    svg.add("<text x=\"10\" y=\"20\" font-size=\"14\">%s</text>\n", title.c_str());
    svg.add("<text x=\"10\" y=\"36\">one dot per (layer, head, sequence, query i &gt;= 1), coloured by layer. Content range "
            "w_i = max_j s_ij - min_j s_ij over j &lt;= i, s = q.k / sqrt(d) (no prior).</text>\n");
    svg.add("<text x=\"10\" y=\"50\">black: mean mass on token 0 in 12 content-range bins of equal count; dashed grey: what "
            "uniform attention, 1/(i+1), would give in the same bins.</text>\n");
    int L = 0;
    for (const auto& m : models)
        for (const SinkPoint& p : m) L = std::max(L, p.layer + 1);
    for (int k = 0; k < 2; ++k) {
        const std::vector<SinkPoint>& pts = models[k];
        const int x0 = mx + k * (pw + mx + 40), y0 = top;
        auto X = [&](double r) { return x0 + pw * r / xmax; };
        auto Y = [&](double m) { return y0 + ph - ph * m; };
        svg.add("<text x=\"%d\" y=\"%d\" font-size=\"12\">%s</text>\n", x0, y0 - 8, names[k]);
        svg.add("<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#999\"/>\n", x0, y0, pw, ph);
        for (double m : {0.0, 0.5, 1.0})
            svg.add("<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.1f</text>\n", x0 - 4, Y(m) + 4, m);
        svg.add("<text x=\"%d\" y=\"%d\">0</text><text x=\"%d\" y=\"%d\" text-anchor=\"end\">%.1f</text>\n", x0, y0 + ph + 14,
                x0 + pw, y0 + ph + 14, xmax);
        svg.add("<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">content range w_i</text>\n", x0 + pw / 2, y0 + ph + 14);
        svg.add("<text x=\"%d\" y=\"%d\" transform=\"rotate(-90 %d %d)\" text-anchor=\"middle\">mass on token 0, P_i0</text>\n",
                x0 - 30, y0 + ph / 2, x0 - 30, y0 + ph / 2);
        const size_t stride = (pts.size() + MAX_POINTS - 1) / MAX_POINTS;
        for (int l = 0; l < L; ++l) {   // dots as zero-length round-capped segments: one <path> per layer
            std::string dots;
            for (size_t n = 0; n < pts.size(); n += stride)
                if (pts[n].layer == l) {
                    char pt[40];
                    std::snprintf(pt, sizeof(pt), "M%.1f %.1fh0", X(pts[n].range), Y(pts[n].mass0));
                    dots += pt;
                }
            svg.raw(std::string("<path fill=\"none\" stroke=\"") + HEAD_COLOURS[l % 8] +
                    "\" stroke-opacity=\"0.35\" stroke-width=\"3.2\" stroke-linecap=\"round\" d=\"" + dots + "\"/>\n");
            if (k == 0) svg.add("<text x=\"%d\" y=\"%d\" fill=\"%s\">layer %d</text>\n", x0 + pw - 50, y0 + 14 + 12 * l, HEAD_COLOURS[l % 8], l);
        }
        std::vector<SinkPoint> s = pts;
        std::sort(s.begin(), s.end(), [](const SinkPoint& a, const SinkPoint& b) { return a.range < b.range; });
        std::string mean_line, uniform_line;
        for (int b = 0; b < 12; ++b) {
            const size_t a = s.size() * b / 12, e = s.size() * (b + 1) / 12;
            if (e <= a) continue;
            double r = 0, m = 0, un = 0;
            for (size_t n = a; n < e; ++n) { r += s[n].range; m += s[n].mass0; un += 1.0 / (s[n].i + 1); }
            char pt[64];
            std::snprintf(pt, sizeof(pt), "%.1f,%.1f ", X(r / (e - a)), Y(m / (e - a)));
            mean_line += pt;
            std::snprintf(pt, sizeof(pt), "%.1f,%.1f ", X(r / (e - a)), Y(un / (e - a)));
            uniform_line += pt;
        }
        svg.raw("<polyline fill=\"none\" stroke=\"#777\" stroke-width=\"1.5\" stroke-dasharray=\"5,3\" points=\"" + uniform_line + "\"/>\n");
        svg.raw("<polyline fill=\"none\" stroke=\"black\" stroke-width=\"2\" points=\"" + mean_line + "\"/>\n");
    }
    svg.save(out, W, H);
    std::printf("sink picture written to %s\n", out.c_str());
    return 0;
}

// ----------------------------------------------------------------------------------------------------------
// contexts: validation loss against the context multiplier, per prior, a panel per data set

int cmd_contexts(const std::string& path, const std::string& out, const std::string& title) {
    std::vector<std::string> datas, priors;
    std::vector<int> mults;
    std::map<std::string, std::map<int, std::vector<double>>> losses;   // "data\tprior" -> mult -> per seed
    for (const auto& r : read_table(path, '\t')) {
        if (r.size() != 6) fail("'" + path + "': expected 6 tab-separated columns: data prior seed mult ctx loss");
        if (std::find(datas.begin(), datas.end(), r[0]) == datas.end()) datas.push_back(r[0]);
        if (std::find(priors.begin(), priors.end(), r[1]) == priors.end()) priors.push_back(r[1]);
        const int m = (int)to_number(r[3], path);
        if (std::find(mults.begin(), mults.end(), m) == mults.end()) mults.push_back(m);
        if (r[5] != "n/a") losses[r[0] + "\t" + r[1]][m].push_back(to_number(r[5], path));
    }
    if (datas.empty()) fail("'" + path + "' holds no results");
    std::sort(mults.begin(), mults.end());
    const int pw = 330, ph = 260, gap = 70, top = 60;
    Svg svg;
    svg.add("<text x=\"10\" y=\"20\" font-size=\"14\">%s</text>\n", title.c_str());
    svg.add("<text x=\"10\" y=\"36\">mean over seeds at L = T_train x m, m = %d .. %d (evenly spaced: a log scale); "
            "a prior with one context (learned positions) is left out</text>\n", mults.front(), mults.back());
    for (size_t k = 0; k < datas.size(); ++k) {
        std::vector<std::vector<double>> series;
        std::vector<std::string> labels;
        for (const std::string& p : priors) {
            const auto& by_mult = losses[datas[k] + "\t" + p];
            std::vector<double> line;
            for (int m : mults) {
                auto it = by_mult.find(m);
                if (it == by_mult.end() || it->second.empty()) break;
                double sum = 0;
                for (double x : it->second) sum += x;
                line.push_back(sum / it->second.size());
            }
            if (line.size() < 2) continue;
            series.push_back(line);
            labels.push_back(p);
        }
        if (series.empty()) continue;
        line_panel(&svg, 60 + (int)k * (pw + gap), top, pw, ph, datas[k], "context multiplier m", series, labels,
                   std::to_string(mults.front()) + "x", std::to_string(mults.back()) + "x");
    }
    svg.save(out, 60 + (int)datas.size() * (pw + gap), top + ph + 30);
    std::printf("loss against context written to %s\n", out.c_str());
    return 0;
}

// ----------------------------------------------------------------------------------------------------------
// curves: validation loss against the step, from train_tiny's progress lines ("step N/M | ... | val X | ...")

int cmd_curves(const std::string& out, const std::string& title, const std::vector<std::string>& logs,
               const std::vector<std::string>& labels) {
    std::vector<std::vector<double>> series;
    int first_step = 1 << 30, last_step = 0;
    for (const std::string& path : logs) {
        std::ifstream in(path);
        if (!in) fail("cannot read '" + path + "'");
        std::vector<double> vals;
        std::string line;
        while (std::getline(in, line)) {
            int step = 0, total = 0;
            double val = 0;
            const size_t v = line.find("| val ");
            if (std::sscanf(line.c_str(), "step %d/%d", &step, &total) != 2 || v == std::string::npos ||
                std::sscanf(line.c_str() + v, "| val %lf", &val) != 1)
                continue;   // not a progress line, or one without a fresh validation loss
            vals.push_back(val);
            first_step = std::min(first_step, step);
            last_step = std::max(last_step, step);
        }
        if (vals.empty()) fail("no validation losses in '" + path + "' (train_tiny's progress lines with --val-every)");
        series.push_back(vals);
    }
    Svg svg;
    line_panel(&svg, 60, 40, 560, 300, title, "step", series, labels, std::to_string(first_step),
               std::to_string(last_step));
    svg.save(out, 660, 380);
    for (size_t k = 0; k < series.size(); ++k)
        std::printf("%s: last validation loss %.4f (%zu points)\n", labels[k].c_str(), series[k].back(), series[k].size());
    if (series.size() == 2)
        std::printf("relative difference of the last values: %.2f%%\n",
                    100 * (series[1].back() - series[0].back()) / series[0].back());
    std::printf("curves written to %s\n", out.c_str());
    return 0;
}

void usage() {
    std::fprintf(stderr, "usage: report table RESULTS_TSV\n"
                         "       report prior PRIOR_CSV OUT_SVG LAYER TITLE\n"
                         "       report sink GOAT_CSV NONE_CSV OUT_SVG TITLE\n"
                         "       report contexts RESULTS_TSV OUT_SVG TITLE\n"
                         "       report curves OUT_SVG TITLE LOG LABEL [LOG LABEL ...]\n");
}

}  // namespace

// ----------------------------------------------------------------------------------------------------------
// main

int main(int argc, char** argv) {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "table" && argc == 3) return cmd_table(argv[2]);
    if (cmd == "prior" && argc == 6) return cmd_prior(argv[2], argv[3], (int)to_number(argv[4], "LAYER"), argv[5]);
    if (cmd == "sink" && argc == 6) return cmd_sink(argv[2], argv[3], argv[4], argv[5]);
    if (cmd == "contexts" && argc == 5) return cmd_contexts(argv[2], argv[3], argv[4]);
    if (cmd == "curves" && argc >= 6 && argc % 2 == 0) {
        std::vector<std::string> logs, labels;
        for (int i = 4; i < argc; i += 2) { logs.push_back(argv[i]); labels.push_back(argv[i + 1]); }
        return cmd_curves(argv[2], argv[3], logs, labels);
    }
    usage();
    return 2;
}
