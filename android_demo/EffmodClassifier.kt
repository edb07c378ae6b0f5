// Minimal EfficientMod classifier for files written by effmod-edge.
// Preprocessing = calibration/preprocess.py: shorter side -> 256 (bicubic there; here bilinear after
// 2x halvings, which approximates it), center crop 224, /255, (x - mean) / std per RGB channel, NHWC.
package dev.effmod.demo

import android.content.Context
import android.graphics.Bitmap
import android.os.Build
import org.json.JSONObject
import org.tensorflow.lite.Interpreter
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel
import kotlin.math.roundToInt

/** Classifies bitmaps with one effmod-edge `.tflite` file; [close] it when done. */
class EffmodClassifier(context: Context, modelAsset: String, threads: Int = 2) : AutoCloseable {
    private val sidecar = JSONObject(context.assets.open("$modelAsset.json").bufferedReader().readText())
    private val input = sidecar.getJSONObject("input")
    private val output = sidecar.getJSONObject("output")
    private val mean = FloatArray(3) { input.getJSONArray("mean").getDouble(it).toFloat() }
    private val std = FloatArray(3) { input.getJSONArray("std").getDouble(it).toFloat() }
    private val int8In = input.getString("dtype") == "int8"
    private val int8Out = output.getString("dtype") == "int8"
    private val assetDir = modelAsset.substringBeforeLast('/', "")
    val labels: List<String> = context.assets.open(
        if (assetDir.isEmpty()) sidecar.getString("labels") else "$assetDir/${sidecar.getString("labels")}"
    ).bufferedReader().readLines()
    private val interpreter: Interpreter

    init {
        val buffer = context.assets.openFd(modelAsset).use { fd ->  // the mapping outlives the descriptor
            FileInputStream(fd.fileDescriptor).use { stream ->
                stream.channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
            }
        }
        interpreter = Interpreter(buffer, Interpreter.Options().setNumThreads(threads))
    }

    /**
     * Resize the shorter side to 256 and center-crop 224, in the integer arithmetic of
     * calibration/preprocess.py: shorter side exactly 256, longer side floor(256 * long / short),
     * crop offset (size - 224) / 2 rounded half to even, as Python's round() does.
     * Android's filter is bilinear without a prefilter, so a large photo is first halved while its
     * shorter side is >= 512, ending between 256 and 511 (each halving averages 2x2 pixels); a single bilinear step from a
     * camera frame would alias. Pixels still differ a little from Pillow's bicubic.
     */
    private fun crop224(bitmap: Bitmap): Bitmap {
        val short = minOf(bitmap.width, bitmap.height).toLong()
        val w = if (bitmap.width.toLong() == short) 256 else (256L * bitmap.width / short).toInt()
        val h = if (bitmap.width.toLong() == short) (256L * bitmap.height / short).toInt() else 256
        var src = bitmap
        while (minOf(src.width, src.height) / 2 >= 256) {
            src = Bitmap.createScaledBitmap(src, src.width / 2, src.height / 2, true)
        }
        val resized = Bitmap.createScaledBitmap(src, w, h, true)
        return Bitmap.createBitmap(resized, cropOffset(w), cropOffset(h), 224, 224)
    }

    private fun cropOffset(size: Int): Int {
        val slack = size - 224
        val low = slack / 2
        return if (slack % 2 == 0 || low % 2 == 0) low else low + 1
    }

    /**
     * The [topK] classes of [bitmap] with their logits (not probabilities: apply a softmax over all
     * 1000 logits for confidences). HARDWARE bitmaps (ImageDecoder, Glide, Coil) are copied to
     * ARGB_8888 first: their pixels cannot be read.
     */
    fun classify(bitmap: Bitmap, topK: Int = 5): List<Pair<String, Float>> {
        val hardware = Build.VERSION.SDK_INT >= Build.VERSION_CODES.O && bitmap.config == Bitmap.Config.HARDWARE
        val readable = if (hardware) bitmap.copy(Bitmap.Config.ARGB_8888, false) else bitmap
        val pixels = IntArray(224 * 224)
        crop224(readable).getPixels(pixels, 0, 224, 0, 0, 224, 224)
        val q = input.optJSONObject("quantization")
        val bytesPerValue = if (int8In) 1 else 4
        val buf = ByteBuffer.allocateDirect(224 * 224 * 3 * bytesPerValue).order(ByteOrder.nativeOrder())
        for (p in pixels) {
            val rgb = floatArrayOf(((p shr 16) and 0xFF) / 255f, ((p shr 8) and 0xFF) / 255f, (p and 0xFF) / 255f)
            for (c in 0 until 3) {
                val x = (rgb[c] - mean[c]) / std[c]
                if (int8In) {
                    val v = (x / q!!.getDouble("scale") + q.getInt("zero_point")).roundToInt().coerceIn(-128, 127)
                    buf.put(v.toByte())
                } else {
                    buf.putFloat(x)
                }
            }
        }
        buf.rewind()
        val logits = FloatArray(labels.size)
        if (int8Out) {
            val raw = Array(1) { ByteArray(labels.size) }
            interpreter.run(buf, raw)
            val oq = output.getJSONObject("quantization")
            for (i in logits.indices) {
                logits[i] = ((raw[0][i] - oq.getInt("zero_point")) * oq.getDouble("scale")).toFloat()
            }
        } else {
            val raw = Array(1) { FloatArray(labels.size) }
            interpreter.run(buf, raw)
            raw[0].copyInto(logits)
        }
        return logits.indices.sortedByDescending { logits[it] }.take(topK).map { labels[it] to logits[it] }
    }

    override fun close() = interpreter.close()
}
